"""The documentation holds: every ``pipelines/run.py`` command in README.md and docs/*.md composes against
``conf/``, the README stays a front page (at most 250 lines), and every relative link points to a file (and
heading) that exists. No Ray is started: a command is composed, never run.

Each command's Hydra overrides are composed in-process by one helper subprocess (through
``pipelines.driver.config.compose``, then resolved as ``pipelines/run.py`` resolves them, so a value left unset
fails too); the first command of each page also goes through a real ``python pipelines/run.py <overrides> --cfg
job``. A command whose overrides hold a placeholder the user must fill (``stage=<name>``) is reported as
skipped, with the command, rather than composed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

SHELL_FENCES = {"bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
INLINE_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
# python / python3 / .venv/bin/python, then pipelines/run.py (or /app/pipelines/run.py), then the overrides.
RUN = re.compile(r"(?:^|[\s;&|(])(?:\S*/)?python3?\s+(?:\S*/)?pipelines/run\.py(?=\s|$)(?P<rest>.*)$", re.S)
PLACEHOLDER = re.compile(r"<[^<>\s]+>|^(?:\.\.\.|…)$|=(?:\.\.\.|…)$")
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
# Hydra's own flags: --cfg/-c and --package/-p take a value; the test adds --cfg job itself.
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p"}
HYDRA_FLAGS = {"--resolve"}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
ENV.pop("MLFLOW_TRACKING_URI", None)  # tracking=server must be given its URI by the documented command itself


@dataclass(frozen=True)
class Command:
    page: Path
    line: int
    text: str
    overrides: tuple[str, ...]
    placeholder: str | None  # the first token the user must fill, if any

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}: {self.text}"


def prose_and_shell(page: Path) -> tuple[str, list[tuple[int, str]]]:
    """The page's text outside code blocks (code blocks blanked, so offsets keep their line numbers), and each
    logical line of its shell code blocks (``\\`` continuations joined) with the line it starts on."""
    prose, shell = [], []
    fence, language, pending, start = None, "", "", 0
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence, language = opened[1], opened[2].lower()
            prose.append("")
            continue
        if fence is not None:
            prose.append("")
            if line.strip().startswith(fence[0] * 3) and line.strip().strip(fence[0]) == "":
                fence = None
                continue
            if language in SHELL_FENCES:
                if not pending:
                    start = number
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                shell.append((start, pending + line))
                pending = ""
            continue
        prose.append(line)
    return "\n".join(prose), shell


def overrides_of(rest: str) -> tuple[str, ...]:
    lexer = shlex.shlex(rest, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = []
    for token in lexer:
        if token in SHELL_OPERATORS or token in {"(", ")"}:
            break
        tokens.append(token)
    overrides, skip = [], False
    for token in tokens:
        if skip:
            skip = False
        elif token in HYDRA_FLAGS_WITH_VALUE:
            skip = True
        elif token not in HYDRA_FLAGS:
            overrides.append(token)
    return tuple(overrides)


def commands(page: Path) -> list[Command]:
    prose, shell = prose_and_shell(page)
    candidates = [(line, text, False) for line, text in shell]
    for match in INLINE_CODE.finditer(prose):
        candidates.append((prose.count("\n", 0, match.start()) + 1, " ".join(match[1].split()), True))
    found = []
    for line, text, inline in sorted(candidates):
        run = RUN.search(text)
        if run is None:
            continue
        overrides = overrides_of(run["rest"])
        if inline and not overrides:
            continue  # `python pipelines/run.py` named in a sentence: the entry point, not a command
        placeholder = next((o for o in overrides if PLACEHOLDER.search(o)), None)
        found.append(Command(page, line, " ".join(text.split()), overrides, placeholder))
    return found


ALL = {page: commands(page) for page in PAGES}
IDS = [str(page.relative_to(ROOT)) for page in PAGES]

# Run in a fresh interpreter: Hydra's global state stays out of pytest's, and its start-up is paid once.
HELPER = """
import json, sys
from omegaconf import OmegaConf
from pipelines import stages
from pipelines.driver.config import compose


def leaves(node, prefix=""):
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    if not items:
        yield prefix, node
    for key, value in items:
        yield from leaves(value, f"{prefix}.{key}" if prefix else str(key))


results = []
for overrides in json.load(sys.stdin):
    try:
        cfg = compose(*overrides)
        if cfg.stage.name not in stages.STAGES:
            raise ValueError(f"no stage {cfg.stage.name!r}; the stages are {', '.join(stages.STAGES)}")
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        # ${oc.env:VAR,???} resolves to the text '???' when VAR is unset: a value the command leaves unset too.
        unset = [key for key, value in leaves(plain) if value == "???"]
        if unset:
            raise ValueError(f"left unset: {', '.join(unset)}")
        results.append(None)
    except Exception as error:
        results.append(f"{type(error).__name__}: {error}")
json.dump(results, sys.stdout)
"""


@pytest.fixture(scope="module")
def composed() -> dict[tuple[str, ...], str | None]:
    """Every command's overrides (each distinct list once) -> None, or why it does not compose."""
    wanted = sorted({c.overrides for cs in ALL.values() for c in cs if c.placeholder is None})
    result = subprocess.run(
        [sys.executable, "-c", HELPER],
        input=json.dumps(wanted),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=120,
    )
    assert result.returncode == 0, f"the compose helper failed:\n{result.stderr[-4000:]}"
    return dict(zip(wanted, json.loads(result.stdout)))


def test_the_docs_hold_commands_to_check():
    checked = [c for cs in ALL.values() for c in cs if c.placeholder is None]
    assert len(checked) >= 30, "the command collector finds too few pipelines/run.py commands"
    assert {page for page, cs in ALL.items() if any(c.placeholder is None for c in cs)} >= {
        README,
        ROOT / "docs" / "data.md",
        ROOT / "docs" / "training.md",
        ROOT / "docs" / "workflow.md",
    }


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_command_composes(page, composed):
    checked = [c for c in ALL[page] if c.placeholder is None]
    failures = [f"{c.where}\n    {composed[c.overrides]}" for c in checked if composed[c.overrides]]
    assert not failures, "commands whose overrides do not compose:\n" + "\n".join(failures)


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_a_command_of_each_page_composes_through_the_entry_point(page):
    runnable = [c for c in ALL[page] if c.placeholder is None]
    if not runnable:
        pytest.skip(f"{page.relative_to(ROOT)} runs no pipelines/run.py command")
    command = runnable[0]
    result = subprocess.run(
        [sys.executable, "pipelines/run.py", *command.overrides, "--cfg", "job"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=60,
    )
    assert result.returncode == 0, f"{command.where}\n--cfg job exited {result.returncode}:\n{result.stderr[-3000:]}"
    assert "stage:" in result.stdout, f"{command.where}\n--cfg job printed no config"


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_commands_with_placeholders_are_listed(page):
    """Not composed: the user fills them in. Shown as a skip so that they stay visible."""
    held = [c for c in ALL[page] if c.placeholder is not None]
    if held:
        pytest.skip(
            f"{page.relative_to(ROOT)}: {len(held)} command(s) with placeholders, not composed: "
            + "; ".join(f"line {c.line} ({c.placeholder}): {c.text}" for c in held)
        )


def test_the_readme_is_a_front_page():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}: move detail to docs/"


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    prose, _ = prose_and_shell(page)
    seen: dict[str, int] = {}
    found = set()
    for line in prose.splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading[1].lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_relative_link_points_to_a_file_that_exists(page):
    prose, _ = prose_and_shell(page)
    broken = []
    for match in LINK.finditer(prose):
        target = match[1]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        line = prose.count("\n", 0, match.start()) + 1
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{page.relative_to(ROOT)}:{line}: {target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{page.relative_to(ROOT)}:{line}: {target} (no heading #{anchor} in {resolved.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)
