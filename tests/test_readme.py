"""README and CI agree: .ci/run runs exactly the README's test command."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- test-command -->", 1)[1]
    return block.split("```bash", 1)[1].split("```", 1)[0].strip()


def test_ci_runs_the_readme_test_command():
    command = readme_test_command()
    assert "pytest" in command
    ci_lines = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()]
    assert command in ci_lines, f".ci/run does not run the README's test command {command!r}"


def test_ci_script_is_executable():
    assert (REPO / ".ci/run").stat().st_mode & 0o111
