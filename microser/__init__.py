"""microser: find, compress and export micro speech-emotion-recognition models."""

__version__ = "0.1.0"

TARGETS = ("arousal", "dominance", "valence")
SAMPLE_RATE = 16000
