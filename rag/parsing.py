"""Parse untrusted documents where they can hurt nothing: one forked child per file, with limits.

A document uploaded over HTTP is parsed by libraries (html2text, pypdf, python-docx) whose cost can be
far out of proportion to the file: 60 KB of unclosed HTML tags takes html2text close to a minute, and a
few MB of zipped XML can unpack to gigabytes. In the manager's own process such a file would hold the
GIL, the knowledge base's lock and the memory every other request needs.

So a `Parser` keeps up to `slots` parse servers: plain `python -m rag.parsing` processes that import
the parsers once and are single-threaded, so forking them is safe and cheap (multiprocessing's own
forkserver would re-import the caller's `__main__`, Ray's worker script, in every child). For each file
a server forks a child that loads and splits it under a CPU-time and an address-space limit, and kills
it after a wall-clock limit. A file over a limit fails alone with a message naming the file and the
limit; a fresh child per file means no file's leftovers count against the next.

Requests, chunks and errors travel as JSON lines: nothing a document controls is ever unpickled.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from langchain_core.documents import Document

from rag.config import ParseLimits, SplitterConfig
from rag.errors import UnsupportedDocumentError

_MIB = 1024 * 1024


# -- the caller's side ----------------------------------------------------------------------------------
class Parser:
    """Loads and splits one file at a time per slot in limited child processes; thread-safe."""

    def __init__(self, limits: ParseLimits) -> None:
        self.limits = limits
        self._idle: queue.LifoQueue[_Server | None] = queue.LifoQueue()  # warm servers first
        for _ in range(limits.slots):
            self._idle.put(None)  # a slot whose server starts on first use

    def __call__(self, path: Path, root: Path, splitter: SplitterConfig, max_bytes: int) -> list[Document]:
        """The chunks of `path`, as `split_documents(load_file(...))` gives them, or
        `UnsupportedDocumentError` naming the file and the limit it broke."""
        request = {"path": str(path), "root": str(root), "splitter": splitter.model_dump(),
                   "max_bytes": max_bytes, "limits": self.limits.model_dump()}
        server = self._idle.get()
        try:
            server = server if server is not None and server.alive() else _Server()
            reply = server.ask(request, self.limits.wall_s + 30)
        except Exception:
            if server is not None:
                server.close()
            server = None
            raise
        finally:
            self._idle.put(server)
        if "error" in reply:
            raise UnsupportedDocumentError(reply["error"])
        return [Document(page_content=text, metadata=metadata) for text, metadata in reply["chunks"]]

    def close(self) -> None:
        """Stops the idle servers (a busy one ends with its caller: it exits when its input closes)."""
        while not self._idle.empty():
            server = self._idle.get_nowait()
            if server is not None:
                server.close()

    def __del__(self) -> None:
        self.close()


class _Server:
    def __init__(self) -> None:
        # The child sees the caller's import path (a Ray worker's includes the project's working dir).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen([sys.executable, "-m", "rag.parsing"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, env=env, close_fds=True)

    def alive(self) -> bool:
        return self._process.poll() is None

    def ask(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps(request).encode("utf-8") + b"\n")
        self._process.stdin.flush()
        line = _read_line(self._process.stdout, timeout_s)
        if not line:
            raise RuntimeError(f"the document parser stopped (exit code {self._process.poll()})")
        return json.loads(line)

    def close(self) -> None:
        self._process.kill()
        self._process.wait(5)


def _read_line(stream: IO[bytes], timeout_s: float) -> bytes:
    """One line from a pipe, or b"" at EOF; TimeoutError when it has not arrived by `timeout_s`."""
    ready, _, _ = select.select([stream], [], [], timeout_s)
    if not ready:
        raise TimeoutError(f"the document parser did not answer in {timeout_s:g} s")
    return stream.readline()


# -- the server's side ----------------------------------------------------------------------------------
def _parse(request: dict[str, Any]) -> dict[str, Any]:
    """Runs in the forked child: the file's chunks, or why it cannot be indexed."""
    from rag.documents import load_file, split_documents

    path, limits = request["path"], request["limits"]
    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL 1 s later
    memory = int(limits["memory_mb"]) * _MIB
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    try:
        chunks = split_documents(load_file(Path(path), Path(request["root"]), max_bytes=request["max_bytes"]),
                                 SplitterConfig.model_validate(request["splitter"]))
        return {"chunks": [[c.page_content, c.metadata] for c in chunks]}
    except UnsupportedDocumentError as exc:
        return {"error": str(exc)}
    except MemoryError:
        return {"error": f"{path}: needs more than the {limits['memory_mb']} MiB of memory one document may use"}
    except RecursionError:
        return {"error": f"{path}: nested too deeply to parse"}
    except Exception as exc:  # a parser's own bug on hostile input: the file fails, not the caller
        return {"error": f"{path}: cannot be parsed ({type(exc).__name__}: {exc})"}


def _child(request: dict[str, Any], out: int) -> None:
    try:
        try:
            data = json.dumps(_parse(request), ensure_ascii=False).encode("utf-8")
        except MemoryError:
            data = json.dumps({"error": f"{request['path']}: its text needs more than the "
                                        f"{request['limits']['memory_mb']} MiB of memory one document may use"}
                              ).encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(out, view):]
    finally:
        os._exit(0)


def _collect(pid: int, out: int, wall_s: float) -> bytes | str:
    """The child's reply, or why there is none. Always reaps the child."""
    deadline, parts = time.monotonic() + wall_s, []
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([out], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                return f"took more than {wall_s:g} s to parse"
            part = os.read(out, 1 << 20)
            if not part:
                break
            parts.append(part)
    finally:
        os.close(out)
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code in (-signal.SIGXCPU, -signal.SIGKILL):  # SIGKILL: the hard CPU limit, or the kernel's OOM killer
        return "needs more CPU time or memory than one document may use"
    if code != 0 or not parts:
        return f"its parser stopped unexpectedly (exit code {code})"
    return b"".join(parts)


def serve(requests: IO[bytes], replies: IO[bytes]) -> None:
    """The parse server's loop: one JSON request per line in, one JSON reply per line out."""
    import rag.documents  # noqa: F401  once here, so every forked child starts with the parsers loaded

    for line in requests:
        request = json.loads(line)
        limits = request["limits"]
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _child(request, write_end)
        os.close(write_end)
        reply = _collect(pid, read_end, float(limits["wall_s"]))
        if isinstance(reply, str):
            reply = json.dumps({"error": f"{request['path']}: {reply} (limits: {limits['cpu_s']} s of CPU, "
                                         f"{limits['memory_mb']} MiB, {limits['wall_s']:g} s)"}).encode("utf-8")
        replies.write(reply + b"\n")
        replies.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
