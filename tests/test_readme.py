"""The README's `artdist ...` commands name real commands and flags, and its set-up says how to reach them."""
import functools
import re
from pathlib import Path

from artdist.cli import COMMANDS, build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@functools.cache
def _options(command: str) -> set[str]:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {opt for action in sub._actions for opt in action.option_strings}


def test_every_artdist_command_in_the_readme_exists_with_its_flags():
    spans = re.findall(r"`(artdist [^`]+)`", README) + re.findall(r"^\s*(artdist [^\n#]+)", README, re.M)
    assert len(spans) > 10
    checked = 0
    for span in spans:
        words = span.replace("\\|", " ").replace("[", " ").replace("]", " ").split()
        if words[1].startswith("--"):
            assert words[1] in {"--version", "--help"}, span
            continue
        command = words[1]
        if command in ("...", "COMMAND", "…"):  # prose about commands in general
            continue
        assert command in COMMANDS, span
        flags = {w.split("=")[0] for w in words[2:] if w.startswith("--")}
        missing = flags - _options(command) - {"--help"}
        assert not missing, f"README: `{span}` uses {sorted(missing)}, which `artdist {command}` does not have"
        checked += 1
    assert checked > 10


def test_the_quick_start_says_how_to_reach_artdist_and_tensorboard():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "source .venv/bin/activate" in quick_start
    assert ".venv/bin/artdist" in quick_start


def test_user_facing_text_has_no_project_history_words():
    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted((root / "jobs").glob("*.yaml")),
             *sorted((root / "artdist").rglob("*.py"))]
    words = ("seed 000", "seed-000", "from the issue", "seeds' way", "seeds' imagefolder", "seeds' recipe",
             "seeds' transforms", "seeds' pipeline", "seeds' cpu pipeline")
    found = [f"{path.relative_to(root)}: {word}" for path in files for word in words
             if word in path.read_text().lower()]
    assert not found, found
