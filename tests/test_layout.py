"""The shape of the code: one path per idea, the library free of applications, no cycles.

Read from the source (ast), so a violation names the file and line that introduced it."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "bitlm"
SOURCES = [
    p for d in ("bitlm", "pipelines", "serve", "tune", "benchmarks", "cluster") for p in (ROOT / d).rglob("*.py")
] + [ROOT / "unified_workflow.py"]
APPLICATION_IMPORTS = ("ray", "mlflow", "fastapi", "starlette", "pydantic", "uvicorn", "flask", "aiohttp", "http")
# The guide names bit_transformer.dashboard_app.run_dashboard: that one name forwards, in a
# function, to the application in serve/ (DESIGN.md allows a one-line re-export).
GUIDE_FORWARDS = {("dashboard_app.py", "serve.dashboard")}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, function-level ones included."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
                names = [f"{module}.{a.name}" for a in node.names] if not node.module else [module]
                out += [(node.lineno, n) for n in names]
            else:
                out.append((node.lineno, node.module))
    return out


def _library_graph() -> dict[str, set[str]]:
    graph = {}
    for path in LIBRARY.glob("*.py"):
        if path.name == "__init__.py":
            continue
        graph[path.stem] = {
            m.split(".")[1]
            for _, m in _imports(path)
            if m.startswith("bitlm.") and m.split(".")[1] != path.stem and (LIBRARY / f"{m.split('.')[1]}.py").exists()
        }
    return graph


def test_the_library_imports_in_one_direction():
    graph = _library_graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt) :] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail(f"import cycle in bitlm: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert graph["checkpoint"] <= {"config", "digest"}  # checkpoints know no model class
    assert {"model", "trainer", "loop"}.isdisjoint(graph["objectives"])


def test_the_library_imports_no_application_framework():
    for path in sorted(LIBRARY.glob("*.py")):
        for line, module in _imports(path):
            top = module.split(".")[0]
            if (path.name, module) in GUIDE_FORWARDS:
                continue
            assert top not in APPLICATION_IMPORTS, f"{path.relative_to(ROOT)}:{line} imports {module}"
            assert top != "serve" and top != "pipelines" and top != "tune", f"{path.name}:{line} imports {module}"


def _uses(pattern: str) -> set[str]:
    rx = re.compile(pattern)
    return {str(p.relative_to(ROOT)) for p in SOURCES if rx.search(p.read_text())}


def test_each_idea_is_written_once():
    # the bit losses: the one objective module
    assert _uses(r"cross_entropy\(") == {"bitlm/objectives.py", "benchmarks/byte_gpt.py"}  # + the yardstick's 256-way
    # gradient clipping: the one optimizer step
    assert _uses(r"clip_grad") == {"bitlm/trainer.py"}
    # K, C and S from logits: the one telemetry rule, everyone else imports its result
    for fn in ("negentropy_logits", "lz_complexity_logits", "symbiosis_score"):
        assert _uses(rf"\b{fn}\(") == {"bitlm/telemetry.py"}, fn
    # the retry loop and its temperature bump: the one gated loop
    assert _uses(r"TEMPERATURE_STEP|\+ 0\.25") == {"bitlm/gated.py"}
    # a categorical draw (bits, bytes, drafts, denoising, the yardstick's bytes): torch_utils.categorical
    assert _uses(r"multinomial\(") == set()
    # GELU (the exact form, off oneDNN for decoding's small tensors): torch_utils.gelu
    assert _uses(r"F\.gelu\(|functional\.gelu\(|nn\.GELU\(") == {"bitlm/torch_utils.py"}
    # the plateau rule: scale.py, used by train_loop and by Tune's scheduler
    assert _uses(r"class \w*Plateau|best - self\.min_delta") == {"bitlm/scale.py"}


def test_no_source_file_does_two_jobs_by_length():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_the_package_loads_its_names_on_first_use():
    """Every guide name resolves from ``bitlm``; a torch-free module (the data pipeline's) can
    be imported without torch, and so can the whole data-preparation job, which every Ray Data
    worker imports; an unknown name is an AttributeError."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import bitlm.config, bitlm.digest, pipelines.prepare_data\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import bitlm\n"
        "from bitlm import *\n"
        "assert all(getattr(bitlm, n) is globals()[n] for n in bitlm.__all__)\n"
        "assert 'torch' in sys.modules and 'BitTransformerLM' in dir(bitlm)\n"
        "try:\n"
        "    bitlm.no_such_name\n"
        "except AttributeError as e:\n"
        "    print(e)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "has no attribute 'no_such_name'" in run.stdout
