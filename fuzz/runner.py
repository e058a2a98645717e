"""Running cases: each in a fresh temporary directory, in a worker process the parent can kill.

A case is ``(master seed, index)``: its random generator picks a seed of the corpus, copies it into
``WORK/caseNNNNNN-*/in``, applies one or two mutations (:mod:`fuzz.mutate`), and runs one command on
it in-process: ``mergekit-ota inspect``, ``export`` (with random options), ``check`` (the merge seed),
or the store reader (``CurvatureStore.load`` of every tensor).  Outcomes:

* ``accepted``: exit 0, and an exported store holds only finite values;
* ``refused``: one of our errors (an :class:`~mergekit_ota.errors.OTAError` shown as ``Error: ...``, a
  click usage error, ``check``'s report of problems) naming a file of the case (``check`` may name a
  parameter instead);
* a finding: any other exception (its type), a traceback in the output, a refusal naming no file,
  non-finite values in an exported store, a file written outside the case's directory, the
  code-execution canary's file appearing, or no answer within the time limit (``hang``: the worker
  is killed and a new one started).

A finding's case directory is kept under ``WORK/findings/`` with ``finding.json`` (the command, the
mutations, the exception and traceback, and how to replay it: ``python -m fuzz --replay INDEX --seed S``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import stat
import tempfile
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

from fuzz.mutate import CANARY, mutate_file, pick_file
from fuzz.seeds import FIXTURES, REPO, Seed

ACCEPTED, REFUSED = "accepted", "refused"


def _snapshot(paths: List[Tuple[str, bool]]) -> Dict[str, Tuple[int, float]]:
    """``{path: (size, mtime)}`` of the entries under each ``(directory, recursive)``."""
    found: Dict[str, Tuple[int, float]] = {}
    for directory, recursive in paths:
        if not os.path.isdir(directory):
            continue
        walker = os.walk(directory) if recursive else [(directory, [], os.listdir(directory))]
        for root, dirs, files in walker:
            for name in list(files) + list(dirs):
                path = os.path.join(root, name)
                try:
                    info = os.lstat(path)
                except OSError:
                    continue
                is_dir = stat.S_ISDIR(info.st_mode)  # a directory counts by its entries (listed themselves)
                found[path] = (0, 0.0) if is_dir else (info.st_size, info.st_mtime)
    return found


def _export_args(rng: random.Random, source: str, case: str) -> List[str]:
    from mergekit_ota.export import SOURCE_KINDS

    out = rng.choice(["out.safetensors", "out", "out/exp_avg_sq.safetensors.index.json"])
    args = ["export", source, os.path.join(case, out), "--quiet"]
    if rng.random() < 0.3:
        args += ["--compress", "rank1"]
    if rng.random() < 0.2:
        args += ["--dtype", "bfloat16"]
    if rng.random() < 0.3:
        args += ["--bias-correct"]
    if rng.random() < 0.1:
        args += ["--source-kind", rng.choice(SOURCE_KINDS)]
    if rng.random() < 0.1:
        args += ["--beta2", "0.999"]
    if rng.random() < 0.05:
        args += ["--step", "5"]
    if out != "out.safetensors" and rng.random() < 0.3:
        args += ["--shard-size", "1KB" if rng.random() < 0.5 else "100"]
    return args


def _store_files(out: str) -> List[str]:
    if os.path.isfile(out):
        return [out] if out.endswith(".safetensors") else []
    files = []
    for root, _, names in os.walk(out):
        files += [os.path.join(root, n) for n in names if n.endswith(".safetensors")]
    return files


def _non_finite(out: str) -> Optional[str]:
    """The first stored tensor of the store at ``out`` holding NaN or Inf, if any."""
    import torch
    from safetensors import safe_open

    target = out if os.path.exists(out) else os.path.dirname(out)
    for file in _store_files(target):
        with safe_open(file, "pt") as fp:
            for key in fp.keys():
                value = fp.get_tensor(key)
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    return f"{file} '{key}'"
    return None


def _names_a_file(text: str, case: str, mutated: List[str]) -> bool:
    """Whether a refusal names a file of the case (or, refusing the fuzzer's own options, the option)."""
    return case in text or any(os.path.basename(m) in text for m in mutated if m) or "Error: --" in text


class CaseRunner:
    """Runs cases of one master seed in this process (the worker's side)."""

    def __init__(self, corpus: str, seeds: List[Seed], work: str, master_seed: int):
        self.corpus, self.seeds, self.work, self.master_seed = corpus, seeds, work, master_seed
        self.watched = [(REPO, False), (FIXTURES, True), (corpus, True), (os.path.expanduser("~"), False)]
        self.before = _snapshot(self.watched)
        self.mutations: Optional[int] = None  # per case; None: one, sometimes two; 0 runs the seeds as they are

    def case_dir(self, index: int) -> str:
        return os.path.join(self.work, f"case{index:06d}")

    def prepare(self, index: int) -> Dict[str, Any]:
        """Copy the case's seed and mutate it; returns the case description."""
        rng = random.Random(f"{self.master_seed}:{index}")
        seed = self.seeds[rng.randrange(len(self.seeds))]
        case = self.case_dir(index)
        if os.path.lexists(case):
            shutil.rmtree(case)
        os.makedirs(case)
        root = os.path.join(case, "in")
        shutil.copytree(os.path.join(self.corpus, seed.root), root, symlinks=True)
        canary = os.path.join(case, CANARY)
        mutations, mutated = [], []
        for _ in range(self.mutations if self.mutations is not None else 1 if rng.random() < 0.8 else 2):
            path = pick_file(root, rng)
            if path is None:
                break
            mutations.append(f"{os.path.relpath(path, root)}: {mutate_file(path, rng, canary)}")
            mutated.append(path)
        command = rng.choice(seed.commands)
        source = os.path.join(root, seed.source)
        if command == "export":
            args = _export_args(rng, source, case)
            if seed.model is not None:
                args += ["--model", os.path.join(root, seed.model)]
        elif command == "inspect":
            args = ["inspect", source] + (["--json"] if rng.random() < 0.3 else [])
        elif command == "check":
            args = ["check", source, "--json"] + (["--full-scan"] if rng.random() < 0.3 else [])
        else:
            args = ["<store reader>", source]
        return {
            "index": index,
            "seed": seed.name,
            "command": command,
            "args": args,
            "mutations": mutations,
            "mutated": mutated,
            "case": case,
            "root": root,
            "canary": canary,
        }

    def run(self, index: int) -> Dict[str, Any]:
        """Prepare and run case ``index``; the case directory is removed unless it is a finding."""
        try:
            info = self.prepare(index)
        except Exception as error:  # noqa: BLE001 - a mutation the engine itself could not make
            detail = "".join(traceback.format_exception(error))[-3000:]
            return {"index": index, "outcome": "fuzzer-error", "detail": detail, "case": self.case_dir(index)}
        with open(os.path.join(info["case"], "case.json"), "w") as fp:  # read by the parent if this case hangs
            json.dump({k: info[k] for k in ("seed", "command", "args", "mutations")}, fp, default=str)
        started = time.monotonic()
        outcome, detail = self._invoke(info)
        info["seconds"] = round(time.monotonic() - started, 3)
        if os.path.lexists(info["canary"]):
            outcome, detail = "CODE-EXECUTION", f"the canary payload ran: {info['canary']} exists"
        after = _snapshot(self.watched)
        changed = sorted(p for p in set(after) | set(self.before) if after.get(p) != self.before.get(p))
        if changed:
            outcome, detail = "wrote-outside", f"files changed outside the case directory: {changed[:5]}"
            self.before = after
        info.update(outcome=outcome, detail=detail)
        return info

    def _invoke(self, info: Dict[str, Any]) -> Tuple[str, str]:
        cwd = os.getcwd()
        tempfile.tempdir = info["case"]
        os.chdir(info["root"])
        try:
            if info["command"] == "store":
                return self._store(info)
            return self._cli(info)
        finally:
            os.chdir(cwd)
            tempfile.tempdir = None

    def _store(self, info: Dict[str, Any]) -> Tuple[str, str]:
        from mergekit_ota.curvature.store import CurvatureStore
        from mergekit_ota.errors import OTAError

        try:
            store = CurvatureStore(info["args"][1])
            for name in store.names():
                value = store.load(name)
                if not bool(value.isfinite().all()):
                    return "non-finite-read", f"CurvatureStore.load('{name}') returned NaN/Inf"
        except OTAError as error:
            if _names_a_file(str(error), info["case"], info["mutated"]):
                return REFUSED, str(error)[:300]
            return "refused-unnamed", str(error)[:300]
        except BaseException as error:  # noqa: BLE001 - every other exception is a finding
            return type(error).__name__, "".join(traceback.format_exception(error))[-4000:]
        return ACCEPTED, ""

    def _cli(self, info: Dict[str, Any]) -> Tuple[str, str]:
        from click.testing import CliRunner

        from mergekit_ota.cli.main import main

        result = CliRunner().invoke(main, info["args"], catch_exceptions=True)
        output = result.output or ""
        error = result.exception
        if error is not None and not isinstance(error, SystemExit):
            return type(error).__name__, "".join(traceback.format_exception(error))[-4000:]
        if "Traceback (most recent call last)" in output:
            return "traceback-in-output", output[-4000:]
        if result.exit_code == 0:
            if info["command"] == "export":
                bad = _non_finite(info["args"][2])
                if bad is not None:
                    return "non-finite-output", f"export exited 0 but {bad} holds NaN/Inf"
            return ACCEPTED, ""
        if info["command"] == "check" or _names_a_file(output, info["case"], info["mutated"]):
            return REFUSED, output.strip()[-300:]
        return "refused-unnamed", output.strip()[-600:]


def _worker(conn: Any, corpus: str, seeds: List[Seed], work: str, master_seed: int) -> None:
    import warnings

    warnings.simplefilter("ignore")
    runner = CaseRunner(corpus, seeds, work, master_seed)
    conn.send("ready")
    while True:
        index = conn.recv()
        if index is None:
            return
        conn.send(runner.run(index))


def _safe_copy(src: str, dst: str) -> None:
    """Copy a case directory, recreating FIFOs and links instead of reading them."""
    for root, dirs, files in os.walk(src):
        target = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(target, exist_ok=True)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path, out = os.path.join(root, name), os.path.join(target, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                os.symlink(os.readlink(path), out)
            elif stat.S_ISFIFO(mode):
                os.mkfifo(out)
            elif stat.S_ISREG(mode):
                shutil.copy2(path, out)


class Pool:
    """One worker process; a case without an answer in ``timeout`` seconds is a hang (worker replaced)."""

    def __init__(self, corpus: str, seeds: List[Seed], work: str, master_seed: int, timeout: float):
        self.args = (corpus, seeds, work, master_seed)
        self.timeout = timeout
        self.context = multiprocessing.get_context("spawn")
        self.process: Any = None
        self.conn: Any = None

    def _start(self) -> None:
        parent, child = self.context.Pipe()
        self.process = self.context.Process(target=_worker, args=(child, *self.args), daemon=True)
        self.process.start()
        self.conn = parent
        if not parent.poll(600) or parent.recv() != "ready":
            raise RuntimeError("the fuzz worker did not start")

    def run(self, index: int) -> Dict[str, Any]:
        if self.process is None or not self.process.is_alive():
            self._start()
        self.conn.send(index)
        if self.conn.poll(self.timeout):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        self.process.kill()
        self.process.join()
        self.process = None
        case = os.path.join(self.args[2], f"case{index:06d}")
        result: Dict[str, Any] = {"seed": "?", "command": "?"}
        try:
            with open(os.path.join(case, "case.json")) as fp:
                result.update(json.load(fp))
        except (OSError, ValueError):
            pass
        result.update(
            index=index, outcome="hang", detail=f"no answer within {self.timeout:g} s (worker killed)", case=case
        )
        return result

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.conn.send(None)
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()


def keep_finding(result: Dict[str, Any], work: str, master_seed: int) -> Optional[str]:
    """Keep a finding's case under ``WORK/findings/`` with ``finding.json``; remove other cases."""
    case = result.get("case")
    if result["outcome"] in (ACCEPTED, REFUSED):
        if case and os.path.isdir(case):
            shutil.rmtree(case, ignore_errors=True)
        return None
    kept = os.path.join(work, "findings", f"{result['index']:06d}-{result['outcome']}")
    if case and os.path.isdir(case):
        if os.path.lexists(kept):
            shutil.rmtree(kept)
        _safe_copy(case, kept)
        shutil.rmtree(case, ignore_errors=True)
    os.makedirs(kept, exist_ok=True)
    record = {k: v for k, v in result.items() if k not in ("mutated",)}
    record["replay"] = f"python -m fuzz --replay {result['index']} --seed {master_seed}"
    with open(os.path.join(kept, "finding.json"), "w") as fp:
        json.dump(record, fp, indent=1, default=str)
    return kept


def outcome_table(counts: Dict[Tuple[str, str], int]) -> str:
    """Outcome counts: one row per seed kind, one column per outcome class."""
    seeds = sorted({s for s, _ in counts})
    outcomes = [ACCEPTED, REFUSED] + sorted({o for _, o in counts} - {ACCEPTED, REFUSED})
    width = max([len(s) for s in seeds] + [5])
    cols = [max(len(o), 6) for o in outcomes]
    lines = ["seed".ljust(width) + "  " + "  ".join(o.rjust(w) for o, w in zip(outcomes, cols)) + "   total"]
    for s in seeds + ["TOTAL"]:
        row = [sum(n for (s2, o2), n in counts.items() if (s == "TOTAL" or s2 == s) and o2 == o) for o in outcomes]
        lines.append(s.ljust(width) + "  " + "  ".join(str(n).rjust(w) for n, w in zip(row, cols)) + f"  {sum(row):6d}")
    return "\n".join(lines)


def findings_of(counts: Dict[Tuple[str, str], int]) -> int:
    return sum(n for (_, o), n in counts.items() if o not in (ACCEPTED, REFUSED))
