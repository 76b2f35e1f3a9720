"""Security properties as tests: no pickle-based loading, servers bound to 127.0.0.1, the SSRF guard
of the crawler, and names from recipes and users that cannot make a path leave the home."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from flows.recipe import RecipeError, load_recipe
from storage.artifacts import ArtifactStore
from storage.home import Home

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for d in ("flows", "stages", "storage", "models", "bench") for p in (REPO / d).rglob("*.py"))


def calls(name: str):
    """(file, ast.Call) of every call to `name` (a dotted suffix: "torch.load", "pickle.load") in the project."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(name):
                yield path, node


def test_no_pickle_based_loading():
    """Weights load through safetensors; the optimizer/RNG state through torch.load(weights_only=True),
    which refuses pickled code. No pickle, joblib, dill, or torch.load without weights_only=True."""
    for path, node in calls("torch.load"):
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        assert kw.get("weights_only") == "True", f"{path.relative_to(REPO)}:{node.lineno}: torch.load without weights_only=True"
    for forbidden in ("pickle.load", "pickle.loads", "joblib.load", "dill.load", "numpy.load", "np.load"):
        for path, node in calls(forbidden):
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            assert forbidden.endswith("np.load") and kw.get("allow_pickle") == "False", \
                f"{path.relative_to(REPO)}:{node.lineno}: {forbidden}"
    text = "\n".join(p.read_text() for p in SOURCES)
    assert "mlflow.pytorch.log_model" not in text and "torch.save(model" not in text


def test_every_server_binds_loopback():
    """Servers the project starts listen on 127.0.0.1 only: the pydoc corpus server, the Prefect API
    server of a run, `family ui` (Prefect and MLflow), anything started with --host."""
    text = {p: p.read_text() for p in SOURCES}
    for path, src in text.items():
        rel = path.relative_to(REPO)
        assert "0.0.0.0" not in src, f"{rel} mentions 0.0.0.0"
        for m in re.finditer(r'"--host",\s*([^,\]]+)', src):
            assert m.group(1).strip() in ('"127.0.0.1"', "host"), f"{rel}: --host {m.group(1)}"
        for m in re.finditer(r"(?:HTTPServer|ThreadingHTTPServer)\(\(\s*([^,]+),", src):
            assert m.group(1).strip() == '"127.0.0.1"', f"{rel}: an HTTP server on {m.group(1)}"
    assert '"--host", "127.0.0.1"' in text[REPO / "flows" / "prefect_env.py"]
    assert text[REPO / "flows" / "cli.py"].count('"--host", "127.0.0.1"') >= 2  # family ui: Prefect and MLflow


def test_the_crawler_refuses_private_addresses_unless_allowed():
    """Private, loopback, link-local and metadata addresses are refused, also after a redirect and
    after DNS (tests/stages/test_crawl.py exercises each against a real server)."""
    from stages.web.fetch import FetchError, resolve

    for host in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "localhost"):
        with pytest.raises(FetchError, match="^blocked_"):
            resolve(host, 80, frozenset())
    assert resolve("127.0.0.1", 80, frozenset({"127.0.0.1"})) == ["127.0.0.1"]
    src = (REPO / "tests" / "stages" / "test_crawl.py").read_text()
    for case in ("test_redirect_to_a_private_address_is_refused", "test_loopback_is_refused_unless_allowed"):
        assert f"def {case}" in src


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "UPPER", "x" * 80, "1st"])
def test_a_stage_name_cannot_leave_the_home(tmp_path, name):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodules:\n  '{name}': tests.flows.toy.source\nstages:\n  '{name}': {{n: 2}}\n")
    with pytest.raises(RecipeError, match="stage name"):
        load_recipe(str(recipe))


@pytest.mark.parametrize("part", ["..", "../x", "a/../../b", "", "/etc"])
def test_home_paths_refuse_names_that_escape(tmp_path, part):
    home = Home(tmp_path / "home").ensure()
    with pytest.raises(ValueError):
        home.stage_dir(part, "fp")
    with pytest.raises(ValueError):
        home.work_dir("stage", part)
    assert ArtifactStore(home).history(part) == []  # `family show ../..` finds nothing instead of listing outside


def test_show_of_a_path_like_stage_is_one_line(tmp_path, capsys):
    from flows.cli import main as cli

    assert cli(["show", "../../etc", "--home", str(Home(tmp_path / "home").ensure().root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no published artifact" in err
