"""Every module the package, the step scripts, the rules and the tests import is a declared dependency.

Imports are read with `ast` (the .smk files line by line); each top-level third-party module is mapped to
the distribution that provides it, through the installed distributions' metadata where it is installed and
the table below where it is not, and must be in pyproject.toml's dependencies (the tests: or its dev
extra). workflow/envs/slidemil.yaml, the environment the jobs run in under `--software-deployment-method
conda`, lists the same requirements as pyproject.toml except Snakemake itself, which runs outside it, and
installs the slidemil package from the checkout.
"""

import ast
import functools
import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from factories import ROOT

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

# Import name -> distribution, for modules not installed here (and the usual suspects, checked either way).
KNOWN = {
    "cv2": "opencv-python-headless",
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
    "PIL": "pillow",
    "openslide": "openslide-python",
    "h5py": "h5py",
    "jinja2": "jinja2",
    "jsonschema": "jsonschema",
    "matplotlib": "matplotlib",
    "numpy": "numpy",
    "pandas": "pandas",
    "scipy": "scipy",
    "snakemake": "snakemake",
    "tifffile": "tifffile",
    "imagecodecs": "imagecodecs",
    "torch": "torch",
    "torchvision": "torchvision",
    "tqdm": "tqdm",
    "pytest": "pytest",
}
FIRST_PARTY = {"slidemil", "_step", "conftest"}
# Snakemake is what runs the jobs, from outside the environment they run in.
NOT_IN_JOB_ENV = {"snakemake"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def top_level_imports(paths) -> dict[str, set[str]]:
    """Top-level module -> files importing it (absolute imports only; relative ones are first party)."""
    found: dict[str, set[str]] = {}
    for path in paths:
        text = path.read_text()
        rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        if path.suffix == ".smk" or path.name == "Snakefile":
            names = re.findall(r"^\s*(?:from|import)\s+([A-Za-z_][\w]*)", text, flags=re.M)
        else:
            names = []
            for node in ast.walk(ast.parse(text, filename=rel)):
                if isinstance(node, ast.Import):
                    names += [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.append(node.module.split(".")[0])
        for name in names:
            found.setdefault(name, set()).add(rel)
    return found


def third_party(found: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: files for m, files in found.items() if m not in sys.stdlib_module_names and m not in FIRST_PARTY}


@functools.lru_cache(maxsize=1)
def installed_modules() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions(module: str) -> set[str]:
    """The distributions that provide ``module`` (installed ones first, then the table)."""
    installed = installed_modules().get(module, [])
    names = {normalize(d) for d in installed}
    if module in KNOWN:
        names.add(normalize(KNOWN[module]))
    return names


def undeclared(imports: dict[str, set[str]], declared: set[str]) -> list[str]:
    problems = []
    for module, files in sorted(imports.items()):
        dists = distributions(module)
        if not dists:
            problems.append(f"{module} (imported by {', '.join(sorted(files))}): no known distribution; "
                            "add it to KNOWN in this test and to the dependencies")
        elif not dists & declared:
            problems.append(f"{module} (imported by {', '.join(sorted(files))}): none of {sorted(dists)} "
                            "is declared")
    return problems


def package_files():
    files = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "workflow" / "scripts").glob("*.py"))
    return files + sorted((ROOT / "workflow" / "rules").glob("*.smk")) + [ROOT / "workflow" / "Snakefile"]


def test_every_import_of_the_package_and_workflow_is_a_dependency():
    declared = {requirement_name(r) for r in pyproject()["project"]["dependencies"]}
    imports = third_party(top_level_imports(package_files()))
    # The scan sees the heavy and the light modules alike (a scan that finds nothing proves nothing).
    assert {"torch", "cv2", "openslide", "pandas", "h5py", "snakemake"} <= set(imports)
    assert undeclared(imports, declared) == []


def test_every_import_of_the_tests_is_a_dependency_or_dev_dependency():
    project = pyproject()["project"]
    declared = {requirement_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    tests = sorted((ROOT / "tests").glob("*.py"))
    imports = third_party(top_level_imports(tests))
    imports = {m: files for m, files in imports.items() if m not in {p.stem for p in tests}}  # each other
    assert "pytest" in imports
    assert undeclared(imports, declared) == []


def test_an_undeclared_import_is_found(tmp_path):
    """The check itself: an import of an undeclared library, or of one nobody knows, is reported."""
    module = tmp_path / "stage.py"
    module.write_text("import os\nimport cv2\nfrom yaml import safe_load\n\n\ndef f():\n"
                      "    import not_a_real_module_xyz\n    from . import sibling\n")
    imports = third_party(top_level_imports([module]))
    assert set(imports) == {"cv2", "yaml", "not_a_real_module_xyz"}
    problems = undeclared(imports, {"pyyaml"})
    assert [p.split(" ")[0] for p in problems] == ["cv2", "not_a_real_module_xyz"]
    assert undeclared({"cv2": {"stage.py"}}, {"opencv-python-headless"}) == []


PACKAGE_LINE = "-e ${SLIDEMIL_SOURCE}"  # workflow/Snakefile sets SLIDEMIL_SOURCE to the checkout


def job_environment_pip() -> list[str]:
    env = yaml.safe_load((ROOT / "workflow" / "envs" / "slidemil.yaml").read_text())
    return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)


def test_job_environment_lists_the_same_requirements():
    pip = [r for r in job_environment_pip() if r != PACKAGE_LINE]
    in_env = {requirement_name(r): re.sub(r"\s+", "", r) for r in pip}
    in_project = {requirement_name(r): re.sub(r"\s+", "", r) for r in pyproject()["project"]["dependencies"]}
    for name in NOT_IN_JOB_ENV:
        in_project.pop(name)
    # Same names and the same version bounds.
    assert in_env == in_project


def test_job_environment_installs_the_package_from_the_checkout(tmp_path):
    """The env's one package line, resolved as conda resolves it: Snakemake hands conda a copy of the env file in
    .snakemake/conda/, conda writes the pip lines to a requirements file there and runs pip in that folder. So
    a relative path would name the working directory, not the checkout; ${SLIDEMIL_SOURCE} names the checkout."""
    pip = job_environment_pip()
    assert [r for r in pip if "slidemil" in r.lower()] == [PACKAGE_LINE]
    assert "SLIDEMIL_SOURCE" in (ROOT / "workflow" / "Snakefile").read_text()
    conda_dir = tmp_path / "work" / ".snakemake" / "conda"
    conda_dir.mkdir(parents=True)
    (conda_dir / "condaenv.abc.requirements.txt").write_text(PACKAGE_LINE + "\n")
    report = tmp_path / "report.json"
    # A dry run resolves and builds the metadata only; nothing is installed, nothing is fetched.
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--no-build-isolation",
           "--quiet", "--report", str(report), "-r", "condaenv.abc.requirements.txt"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    proc = subprocess.run(cmd, cwd=conda_dir, env=dict(env, SLIDEMIL_SOURCE=str(ROOT)), capture_output=True,
                          text=True, timeout=300)
    if proc.returncode and "No module named pip" in proc.stderr:
        pytest.skip("pip is not installed in this interpreter")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (installed,) = json.loads(report.read_text())["install"]
    assert installed["metadata"]["name"] == "slidemil"
    assert installed["download_info"] == {"url": ROOT.as_uri(), "dir_info": {"editable": True}}
