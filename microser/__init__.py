"""microser: find, compress and export micro speech-emotion-recognition models."""

__version__ = "0.1.0"

TARGETS = ("arousal", "dominance", "valence")
SAMPLE_RATE = 16000
MIN_SECONDS = 0.25  # every model accepts any input at least this long (4000 samples); see microser.frontends
