"""The README's Python snippets run as written, in order, in one namespace."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _snippets():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_starts_with_the_two_setup_commands():
    text = README.read_text(encoding="utf-8")
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).splitlines()
    assert first_block[0].startswith('pip install -e . && jnn train')
    assert first_block[1].startswith('pip install -e ".[dev]" && pytest')


@pytest.mark.slow
def test_readme_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    snippets = _snippets()
    assert len(snippets) >= 8
    for i, code in enumerate(snippets):
        exec(compile(code, f"README.md snippet {i}", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["result"].best["accuracy"] > 0.8  # a small MLP, 200 more steps: far above chance (0.1)
