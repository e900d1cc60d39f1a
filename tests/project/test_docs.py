"""First contact: the README stays a short front door, every relative link in the docs opens, the
command line lists every benchmark, and the package declares what it imports."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

from dropgrad_dist.bench import BENCHMARKS

ROOT = Path(__file__).resolve().parents[2]
README_LIMIT = 12_000

# [text](target) and ![alt](target); the target ends at whitespace or ")" (an optional "title" follows).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = ("http://", "https://", "mailto:")


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md")),
             *sorted((ROOT / "examples").rglob("README.md"))]
    return [f for f in files if f.is_file()]


def _prose(text: str) -> str:
    """The text without code blocks and inline code, where brackets are code, not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    return LINK.findall(_prose(path.read_text(encoding="utf-8")))


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = anchor(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")  # GitHub numbers repeated headings
    return result


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        if target.startswith(EXTERNAL):
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target} (no heading #{fragment} in {resolved.name})")
    return broken


def test_the_documents_exist():
    names = {p.relative_to(ROOT).as_posix() for p in markdown_files()}
    for required in ("README.md", "CONTRIBUTING.md", "docs/concepts.md", "docs/ddp.md", "docs/fsdp.md",
                     "docs/clipping.md", "docs/gnp_sam.md", "docs/accelerate.md", "docs/migrating.md",
                     "examples/vit/README.md", "examples/analysis/README.md"):
        assert required in names
    assert any(name.startswith("docs/benchmarks/") for name in names)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_the_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## The `step` count\n")
    page.write_text("# Page\n[ok](other.md#the-step-count) [self](#page) [gone](missing.md) "
                    "[no heading](other.md#nowhere) `[code](not-a-link.md)`\n"
                    "```\n[in a block](also-not-a-link.md)\n```\n[web](https://example.org/x.md)\n")
    assert broken_links(page) == ["missing.md (no such file)", "other.md#nowhere (no heading #nowhere in other.md)"]


def test_readme_is_a_short_front_door():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) <= README_LIMIT, f"README.md has {len(text)} characters; move detail to docs/"
    for command in ("bash launch/demo.sh", "bash launch/test.sh"):
        assert command in text


def test_command_line_help_lists_every_benchmark():
    done = subprocess.run([sys.executable, "-m", "dropgrad_dist", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    for name, module_name in BENCHMARKS.items():
        module = __import__(module_name, fromlist=["run"])
        summary = module.__doc__.strip().splitlines()[0]
        assert re.search(rf"^\s+{name}\s+{re.escape(summary)}$", done.stdout, re.MULTILINE), (name, done.stdout)


# Imported only where the hardware provides it: Triton ships with CUDA builds of torch.
OPTIONAL_IMPORTS = {"triton"}


def test_package_metadata_declares_every_import_and_an_spdx_license():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"  # an SPDX expression: the TOML-table form is deprecated by setuptools
    # The integrations' trainer libraries are declared in their extras (dropgrad_dist.integrations).
    requirements = [*project["dependencies"], *project["optional-dependencies"]["transformers"],
                    *project["optional-dependencies"]["lightning"]]
    declared = {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}
    imported = set()
    for source in (ROOT / "dropgrad_dist").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"dropgrad_dist", "__future__"} - OPTIONAL_IMPORTS
    assert third_party - declared == set()


def test_ruff_is_clean():
    """The conventions of CONTRIBUTING.md that a linter can check (config in pyproject.toml)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e .[dev])")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([ruff, "check", str(root)], capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
