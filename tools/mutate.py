"""A small mutation runner: realistic wrong changes to vlm-rl's modules, each run against the tests that should catch it.

    python tools/mutate.py                               every target of tools/mutation_targets.yaml, 12 mutants each
    python tools/mutate.py --module vlm_rl/algorithms/losses.py --per-module 40
    python tools/mutate.py --list vlm_rl/algorithms/losses.py   the mutation sites, nothing run

Each mutant changes one expression or statement of the module's source (an operator swapped, a comparison loosened,
a constant nudged, a call's arguments swapped or a keyword dropped, a reduction changed, a statement removed); its
module's tests (`mutation_targets.yaml`) then run in a scratch copy of the checkout (a `git worktree` of HEAD plus the
working tree's uncommitted changes), so the checkout itself is never touched. A mutant is **killed** when a test fails,
**timeout** when the tests take more than `--timeout-factor` times the unmutated run (counted as killed, as mutmut
does), and **survived** otherwise. Survivors are printed with their diff: each is a test to write, or a change that
does not change behaviour, accepted with its reason in `tools/mutation_accepted.yaml` (matched by module, function and
the two snippets, so accepted survivors stay accepted when lines move).

Not run in CI: a round takes tens of minutes on 2 CPU cores. docs/testing.md holds the last result.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TARGETS = Path(__file__).with_name("mutation_targets.yaml")
ACCEPTED = Path(__file__).with_name("mutation_accepted.yaml")

SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div, ast.Pow: ast.Mult}
SWAP_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
SWAP_BOOLOP = {ast.And: ast.Or, ast.Or: ast.And}
# Config fields a wrong change confuses (same type, often the same default): each is replaced by the others of its group.
CONFUSABLE = [
    {"cliprange", "cliprange_value", "epsilon_high"}, {"kl_coef", "vf_coef", "entropy_coef"}, {"gamma", "lam"},
    {"per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches"}, {"learning_rate", "critic_learning_rate"},
    {"max_new_tokens", "max_prompt_length"}, {"num_ppo_epochs", "num_mini_batches"}, {"save_steps", "logging_steps", "eval_steps"},
    {"local_batch_size", "local_mini_batch_size"}, {"max_skipped_steps", "max_unscored_fraction"},
]
SWAP_NAME = {"min": "max", "max": "min", "sum": "mean", "mean": "sum", "any": "all", "all": "any", "amin": "amax", "amax": "amin", "clamp_min": "clamp_max", "clamp_max": "clamp_min"}


@dataclass
class Mutation:
    module: str  # path relative to the repo
    function: str  # the enclosing function (qualified), or "<module>"
    line: int
    kind: str
    before: str
    after: str
    start: tuple[int, int]  # (line, col) of the replaced source segment
    end: tuple[int, int]


def _segment_bounds(node: ast.AST) -> tuple[tuple[int, int], tuple[int, int]]:
    return (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset)


def _variants(node: ast.AST) -> list[tuple[str, ast.AST | None]]:
    """(kind, mutated copy) for each realistic wrong change of `node` itself (None: the statement removed)."""
    out = []

    def changed(kind: str, edit) -> None:
        new = copy.deepcopy(node)
        if edit(new) is not False:
            out.append((kind, new))

    if isinstance(node, ast.BinOp) and type(node.op) in SWAP_BINOP:
        changed("operator", lambda n: setattr(n, "op", SWAP_BINOP[type(n.op)]()))
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in SWAP_CMP:
        changed("comparison", lambda n: setattr(n, "ops", [SWAP_CMP[type(n.ops[0])]()]))
    if isinstance(node, ast.BoolOp) and type(node.op) in SWAP_BOOLOP:
        changed("boolean", lambda n: setattr(n, "op", SWAP_BOOLOP[type(n.op)]()))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        out.append(("unary dropped", copy.deepcopy(node.operand)))
    if isinstance(node, ast.Constant) and type(node.value) in (int, float) and not isinstance(node.value, bool):
        value = node.value
        for new_value in ({0: [1], 1: [0, 2]}.get(value, [value * 2 if value else 1, 0 if value else 1])):
            changed("constant", lambda n, v=new_value: setattr(n, "value", type(value)(v)))
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        changed("constant", lambda n: setattr(n, "value", not n.value))
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name in SWAP_NAME:
            def rename(n):
                if isinstance(n.func, ast.Attribute):
                    n.func.attr = SWAP_NAME[name]
                else:
                    n.func.id = SWAP_NAME[name]
            changed("reduction", rename)
        positional = [a for a in node.args if not isinstance(a, ast.Starred)]
        same_kind = len(positional) >= 2 and isinstance(positional[0], ast.Constant) == isinstance(positional[1], ast.Constant)
        if same_kind and len(positional) == len(node.args):
            def swap(n):
                n.args[0], n.args[1] = n.args[1], n.args[0]
            changed("arguments swapped", swap)
        for i, keyword in enumerate(node.keywords):
            if keyword.arg is not None:
                changed(f"keyword {keyword.arg} dropped", lambda n, i=i: n.keywords.pop(i))
    if isinstance(node, ast.Attribute):
        for group in CONFUSABLE:
            if node.attr in group:
                for other in sorted(group - {node.attr}):
                    changed(f"field {node.attr} -> {other}", lambda n, o=other: setattr(n, "attr", o))
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        out.append(("statement removed", None))
    if isinstance(node, ast.AugAssign) and type(node.op) in SWAP_BINOP:
        changed("operator", lambda n: setattr(n, "op", SWAP_BINOP[type(n.op)]()))
    return out


def mutation_sites(module: str, root: Path = REPO) -> list[Mutation]:
    """Every mutation of `module` (a path relative to `root`), in source order; docstrings, logging calls, raise
    messages and type annotations are left alone (changing them changes no behaviour a test should pin)."""
    source = (root / module).read_text()
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    found = []

    def text(start, end) -> str:
        (l0, c0), (l1, c1) = start, end
        if l0 == l1:
            return lines[l0 - 1][c0:c1]
        return lines[l0 - 1][c0:] + "".join(lines[l0:l1 - 1]) + lines[l1 - 1][:c1]

    def skip(node: ast.AST) -> bool:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            return True  # docstring
        if isinstance(node, (ast.Raise, ast.AnnAssign, ast.arguments, ast.Import, ast.ImportFrom, ast.JoinedStr)):
            return True
        call = node.value if isinstance(node, ast.Expr) else node
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name) and call.func.value.id in ("logger", "warnings", "console"):
            return True  # what a log line says is read by people; tests pin the warnings that matter by their text
        return False

    def walk(node: ast.AST, function: str) -> None:
        if skip(node):
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            function = node.name if function == "<module>" else f"{function}.{node.name}"
            for child in node.body:
                walk(child, function)
            return
        if hasattr(node, "lineno") and hasattr(node, "end_lineno"):
            for kind, new in _variants(node):
                start, end = _segment_bounds(node)
                before = text(start, end)
                after = "pass" if new is None else ast.unparse(new)
                if new is not None and "\n" in before and isinstance(node, ast.stmt):
                    continue
                found.append(Mutation(module, function, node.lineno, kind, before, after, start, end))
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.FunctionDef) and child in node.decorator_list:
                continue
            if isinstance(node, (ast.AnnAssign, ast.arg)) or (isinstance(node, ast.FunctionDef) and child is node.returns):
                continue
            walk(child, function)

    walk(tree, "<module>")
    return found


def apply(mutation: Mutation, source: str) -> str:
    """`source` with the mutation's segment replaced (a removed statement becomes `pass`, keeping the block valid)."""
    lines = source.splitlines(keepends=True)
    (l0, c0), (l1, c1) = mutation.start, mutation.end
    head = "".join(lines[: l0 - 1]) + lines[l0 - 1][:c0]
    tail = lines[l1 - 1][c1:] + "".join(lines[l1:])
    mutated = head + mutation.after + tail
    ast.parse(mutated)  # a mutant that does not parse is a bug of this tool
    return mutated


def accepted(mutation: Mutation, reasons: list[dict]) -> str | None:
    for r in reasons:
        if r["module"] == mutation.module and r["function"] == mutation.function and r["before"].strip() == mutation.before.strip() and r["after"].strip() == mutation.after.strip():
            return r["reason"]
    return None


def scratch_copy() -> Path:
    """A worktree of HEAD with the working tree's uncommitted changes applied: the mutants' playground."""
    path = Path(tempfile.mkdtemp(prefix="vlm-rl-mutate-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(path), "HEAD"], cwd=REPO, check=True, capture_output=True)
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=REPO, check=True, capture_output=True).stdout
    if diff:
        subprocess.run(["git", "apply", "--whitespace=nowarn"], cwd=path, input=diff, check=True, capture_output=True)
    for untracked in subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=REPO, check=True, capture_output=True, text=True).stdout.split():
        (path / untracked).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / untracked, path / untracked)
    return path


def run_tests(workdir: Path, tests: list[str], timeout: float | None) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": str(workdir), "VLM_RL_CACHE": str(workdir / ".cache")}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", *tests]
    started = time.time()
    try:
        result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - started
    return ("survived" if result.returncode == 0 else "killed"), time.time() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", help="a module path (repeatable); default: every target")
    parser.add_argument("--per-module", type=int, default=12, help="mutants sampled per module")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-factor", type=float, default=3.0)
    parser.add_argument("--list", metavar="MODULE", help="print the mutation sites of MODULE and exit")
    parser.add_argument("--tests", nargs="+", help="pytest arguments instead of the module's targets (a quick look)")
    parser.add_argument("--out", default="mutation-results.jsonl", help="one JSON line per mutant")
    args = parser.parse_args(argv)
    if args.list:
        for m in mutation_sites(args.list):
            print(f"{m.line:>5} {m.function:<40} {m.kind:<24} {m.before.strip()[:50]!r} -> {m.after.strip()[:50]!r}")
        return 0
    targets = yaml.safe_load(TARGETS.read_text())
    reasons = yaml.safe_load(ACCEPTED.read_text()) or [] if ACCEPTED.exists() else []
    modules = args.module or list(targets)
    workdir = scratch_copy()
    summary = {}
    try:
        with open(args.out, "w") as out:
            for module in modules:
                tests = args.tests or targets[module]
                baseline, seconds = run_tests(workdir, tests, None)
                if baseline != "survived":
                    raise SystemExit(f"{module}: its tests fail before any mutation ({' '.join(tests)}); fix them first")
                sites = mutation_sites(module, workdir)
                chosen = random.Random(f"{args.seed}:{module}").sample(sites, min(args.per_module, len(sites)))
                original = (workdir / module).read_text()
                counts = {"killed": 0, "timeout": 0, "survived": 0, "accepted": 0}
                for m in chosen:
                    (workdir / module).write_text(apply(m, original))
                    try:
                        outcome, took = run_tests(workdir, tests, max(60.0, args.timeout_factor * seconds))
                    finally:
                        (workdir / module).write_text(original)
                    reason = accepted(m, reasons) if outcome == "survived" else None
                    counts["accepted" if reason else outcome] += 1
                    out.write(json.dumps({**asdict(m), "outcome": outcome, "accepted": reason, "seconds": round(took, 1)}) + "\n")
                    out.flush()
                    mark = {"killed": "killed  ", "timeout": "timeout ", "survived": "SURVIVED"}[outcome] if not reason else "accepted"
                    print(f"{mark} {module}:{m.line} {m.function} [{m.kind}] {m.before.strip()[:60]!r} -> {m.after.strip()[:60]!r}", flush=True)
                summary[module] = counts
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(workdir)], cwd=REPO, capture_output=True)
    print("\n| module | mutants | killed | timeout | accepted | survived |\n|---|---|---|---|---|---|")
    for module, c in summary.items():
        print(f"| `{module}` | {sum(c.values())} | {c['killed']} | {c['timeout']} | {c['accepted']} | {c['survived']} |")
    total = {k: sum(c[k] for c in summary.values()) for k in ("killed", "timeout", "accepted", "survived")}
    caught = total["killed"] + total["timeout"]
    n = sum(total.values())
    print(f"\ncaught {caught} of {n} ({caught / max(n, 1):.0%}); accepted {total['accepted']}; survived {total['survived']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
