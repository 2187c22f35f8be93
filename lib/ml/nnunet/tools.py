"""Running nnU-Net v2 (the optional ``nnunet`` extra) from the workspace: is it installed, its three
folders, and its commands in a child process whose output streams to the caller.

nnU-Net reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` from the environment
when it is first imported, and starts its own worker pools; so every nnU-Net step runs as a child
process (its console scripts, or a job module of ours for its Python API) with those folders set
under the run folder (:class:`NnunetFolders`, never the user's home) and ``torch.compile`` off on
a CPU. Its output is printed line by
line (progress bars thinned to one line per 10 s) and kept in a log file.

What needs torchvision: with the pinned CPU torch, PyPI's torchvision (pulled in by timm) does not
import ("operator torchvision::nms does not exist"), so ``make setup EXTRAS=nnunet`` removes it.
nnU-Net's planner, preprocessing, trainer (PlainConvUNet / residual-encoder U-Nets), augmentation
and predictor never import it. What does: timm, hence the Primus / EVA architectures and nnU-Net's
search for a trainer class by name (``-tr X`` on its command line, ``initialize_from_trained_model_folder``),
which imports every trainer module it ships, Primus included. So training and prediction here run
through nnU-Net's Python API with the trainer class given (:mod:`lib.ml.nnunet.jobs`).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "make setup EXTRAS=nnunet (pip install -e '.[nnunet]' -c constraints/torch-cpu.txt)"
TRAINER = "nnUNetTrainerSpine1k"
"""nnU-Net's own trainer with its schedule from the params (:mod:`lib.ml.nnunet.trainer`)."""


class NnunetMissingError(RuntimeError):
    """nnU-Net v2 is not installed in this environment."""


class NnunetError(RuntimeError):
    """An nnU-Net command failed: the command, its exit status and the end of its output."""

    def __init__(self, command: Sequence[str], returncode: int, tail: str, log: Path | None = None):
        self.command, self.returncode, self.tail, self.log = list(command), returncode, tail, log
        where = f" (full log: {log})" if log else ""
        super().__init__(f"{Path(command[0]).name} {' '.join(command[1:])} exited with {returncode}{where}:\n{tail}")


def missing_reason() -> str | None:
    """None when nnU-Net v2 can run here, else why not (with the install command)."""
    if importlib.util.find_spec("nnunetv2") is None:
        return f"nnU-Net v2 is not installed: {INSTALL_HINT}"
    if not script("nnUNetv2_train").exists():
        return f"nnU-Net v2's commands are not in {Path(sys.executable).parent}: {INSTALL_HINT}"
    return None


def require() -> None:
    """Raise :class:`NnunetMissingError` (saying how to install it) unless nnU-Net v2 can run."""
    reason = missing_reason()
    if reason:
        raise NnunetMissingError(reason)


def script(name: str) -> Path:
    """An nnU-Net console script of this interpreter's environment."""
    return Path(sys.executable).parent / name


@dataclass(frozen=True)
class NnunetFolders:
    """nnU-Net's three folders under one root (``<root>/nnUNet_raw``, ``nnUNet_preprocessed``,
    ``nnUNet_results``)."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "nnUNet_results"

    def make(self) -> NnunetFolders:
        for f in (self.raw, self.preprocessed, self.results):
            f.mkdir(parents=True, exist_ok=True)
        return self

    def environment(self, device: str = "cpu", da_workers: int | None = None,
                    extra: Mapping[str, str] | None = None) -> dict:
        """The child's environment: the folders, our trainers, compile off on a CPU and, for
        training, the augmentation workers (``da_workers`` 0: in the training process; nnU-Net's
        planner must not see 0, it sets torch's thread count from it)."""
        env = dict(os.environ)
        env.update({"nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
                    "nnUNet_results": str(self.results),
                    "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"})
        if da_workers is not None:
            env["nnUNet_n_proc_DA"] = str(int(da_workers))
        if device == "cpu":
            env["nnUNet_compile"] = "false"
        env.update({k: str(v) for k, v in (extra or {}).items()})
        return env


def _is_progress(line: str) -> bool:
    return "%|" in line or line.rstrip().endswith("it/s]") or line.rstrip().endswith("s/it]")


def run(command: Sequence[str | Path], env: Mapping[str, str], log: Path | None = None,
        echo: Callable[[str], None] | None = print, tail_lines: int = 40, progress_every_s: float = 10.0) -> str:
    """Run ``command`` with ``env``, printing its output as it comes (progress-bar updates at most
    every ``progress_every_s`` and at 100 %) and appending it to ``log``.

    Returns:
        The whole output.

    Raises:
        NnunetError: non-zero exit, with the last ``tail_lines`` lines.
    """
    command = [str(c) for c in command]
    lines: list[str] = []
    last_bar = 0.0
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    sink = open(log, "a", encoding="utf-8", buffering=1) if log is not None else None  # noqa: SIM115  (closed below; line-buffered: the log is live)
    try:
        if sink:
            sink.write(f"$ {' '.join(command)}\n")
        with subprocess.Popen(command, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1, errors="replace") as proc:
            for raw in proc.stdout:  # text mode: a progress bar's \r also ends a line
                line = raw.rstrip("\n")
                lines.append(line)
                if sink:
                    sink.write(line + "\n")
                if echo is None or not line.strip():
                    continue
                if _is_progress(line):
                    now = time.monotonic()
                    if now - last_bar < progress_every_s and "100%" not in line:
                        continue
                    last_bar = now
                echo(line)
            rc = proc.wait()
    finally:
        if sink:
            sink.close()
    if rc != 0:
        raise NnunetError(command, rc, "\n".join(ln for ln in lines[-tail_lines:] if not _is_progress(ln)),
                          log)
    return "\n".join(lines)
