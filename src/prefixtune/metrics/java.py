"""The Java tools that ``pycocoevalcap`` ships: the Stanford PTB tokenizer and METEOR 1.5.

Both are run exactly as pycocoevalcap runs them (same jars, same flags), with
two practical changes that do not alter scores: temporary files go to the
system temp directory instead of site-packages, and the JVM is told to use
UTF-8 (``-Dfile.encoding=UTF-8``) so non-ASCII text survives a POSIX locale.
METEOR keeps one JVM per process (``meteor_session``): its paraphrase table
takes seconds to load, and segment statistics do not depend on what was scored
before, so reusing the JVM cannot change a score.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from .errors import MetricsError

# Punctuation tokens that pycocoevalcap's PTBTokenizer drops after tokenising.
PTB_PUNCTUATIONS = ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                    ".", "?", "!", ",", ":", "-", "--", "...", ";"]
JAVA_ENV = "PREFIXTUNE_JAVA"


def java_executable() -> str:
    """Path of ``java`` ($PREFIXTUNE_JAVA or PATH); MetricsError when there is none."""
    java = os.environ.get(JAVA_ENV) or shutil.which("java")
    if not java or not (Path(java).is_file() or shutil.which(java)):
        raise MetricsError("Java not found: METEOR and the PTB tokenizer need a Java runtime (JRE 8+) on PATH "
                           f"(e.g. `apt-get install default-jre-headless`) or ${JAVA_ENV}=/path/to/java")
    return java


def _coco_dir() -> Path:
    try:
        import pycocoevalcap
    except ImportError as exc:
        raise MetricsError("pycocoevalcap is not installed (pip install pycocoevalcap)") from exc
    return Path(list(pycocoevalcap.__path__)[0])


def _jar(relative: str) -> Path:
    path = _coco_dir() / relative
    if not path.is_file():
        raise MetricsError(f"{path.name} not found in the pycocoevalcap install ({path})")
    return path


def ptb_tokenize(sentences: list[str]) -> list[str]:
    """pycocoevalcap ``PTBTokenizer``: lowercased PTB tokens, punctuation tokens removed, one line per input."""
    if not sentences:
        return []
    java = java_executable()
    jar = _jar("tokenizer/stanford-corenlp-3.4.1.jar")
    text = "\n".join(s.replace("\n", " ") for s in sentences)
    with tempfile.TemporaryDirectory(prefix="prefixtune-ptb-") as tmp:
        path = Path(tmp) / "sentences.txt"
        path.write_bytes(text.encode())
        cmd = [java, "-Dfile.encoding=UTF-8", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", str(path)]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
        except OSError as exc:
            raise MetricsError(f"could not run Java for the PTB tokenizer: {exc}") from exc
    if proc.returncode != 0:
        raise MetricsError(f"PTB tokenizer failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}")
    lines = proc.stdout.decode("utf-8", errors="replace").split("\n")
    if len(lines) < len(sentences):
        raise MetricsError(f"PTB tokenizer returned {len(lines)} lines for {len(sentences)} sentences")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATIONS)
            for line in lines[:len(sentences)]]


class Meteor:
    """METEOR 1.5 (pycocoevalcap's jar) in ``-stdio -l en -norm`` mode; use as a context manager."""

    def __init__(self):
        java = java_executable()
        jar = _jar("meteor/meteor-1.5.jar")
        cmd = [java, "-Dfile.encoding=UTF-8", "-jar", "-Xmx2G", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
        try:
            self._proc = subprocess.Popen(cmd, cwd=str(jar.parent), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL)
        except OSError as exc:
            raise MetricsError(f"could not start METEOR with Java: {exc}") from exc

    def _readline(self) -> str:
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.poll()
            raise MetricsError(f"METEOR stopped unexpectedly (exit {code}); is there 2 GB of memory for its JVM?")
        return line.decode("utf-8", errors="replace").strip()

    def _write(self, line: str) -> None:
        try:
            self._proc.stdin.write((line + "\n").encode("utf-8"))
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise MetricsError(f"METEOR stopped unexpectedly: {exc}") from exc

    def stats(self, hypothesis: str, references: list[str]) -> str:
        """Sufficient statistics of one segment (pycocoevalcap ``Meteor._stat``)."""
        hypothesis = hypothesis.replace("|||", "").replace("  ", " ")
        self._write(" ||| ".join(("SCORE", " ||| ".join(references), hypothesis)))
        return self._readline()

    def aggregate(self, stats: list[str]) -> tuple[float, list[float]]:
        """(system score, segment scores) from segment statistics: one ``EVAL`` line, summed statistics."""
        if not stats:
            raise MetricsError("nothing to score: no hypotheses")
        self._write("EVAL ||| " + " ||| ".join(stats))
        try:
            segments = [float(self._readline()) for _ in stats]
            total = float(self._readline())
        except ValueError as exc:
            raise MetricsError(f"unexpected METEOR output: {exc}") from exc
        return total, segments

    def corpus_score(self, hypotheses: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
        """As pycocoevalcap ``Meteor.compute_score``; the same number as METEOR's file mode (``aggStats``)."""
        if len(hypotheses) != len(references):
            raise MetricsError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
        return self.aggregate([self.stats(h, r) for h, r in zip(hypotheses, references)])

    def alive(self) -> bool:
        return getattr(self, "_proc", None) is not None and self._proc.poll() is None

    def close(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


_shared: Meteor | None = None
_shared_lock = threading.RLock()


@contextlib.contextmanager
def meteor_session():
    """The process-wide METEOR (started on first use, closed at exit), held exclusively while in use."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.alive():
            _shared = Meteor()
        try:
            yield _shared
        except BaseException:
            _shared.close()  # the stdio protocol may be out of step now; start afresh next time
            _shared = None
            raise


def close_meteor() -> None:
    """Stop the shared METEOR JVM (it is also stopped when the process exits)."""
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.close()
            _shared = None


atexit.register(close_meteor)

