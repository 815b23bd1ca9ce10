"""Training on several processes with torch.distributed: ``torchrun ... -m lrviz run`` and ``lrviz.track``
inside a loop that initialized a process group.

lrviz adds no launcher of its own: torchrun starts the ranks, every rank runs the same loop, rank 0
records the run (the store, the live endpoint) and the others follow it.

* **One run.** Each rank keeps its steps' losses where they are (floats on the CPU, 0-d tensors on
  an accelerator, never read per step). At steps the ranks agree on, one collective adds them up:
  every rank then holds the mean over ranks, rank 0 records it, and the divergence guard decides the
  same thing on every rank.
* **Steering at the same step.** The same collective carries a few numbers from rank 0 (the next
  agreed step, pause, stop, the length of the commands that follow); only when there are commands
  does a second one carry their JSON text. Every rank applies them before the same step, and the ack
  names it. Rank 0 picks the next agreed step from its step rate (about every ``SYNC_S`` seconds, at
  most ``MAX_INTERVAL`` steps on, the very next step after a step-once, and each periodic
  checkpoint's step). A paused rank 0 sends a heartbeat every few seconds: the others wait inside
  lrviz's collective, never past its timeout, and none can run ahead into a training collective.
* **Faults.** A rank that fails writes its message into the job's key-value store (torchrun's) and
  ends; its connections close, so the other ranks' collectives fail at once: they report that rank's
  message, and rank 0 records it. A rank that dies without a word is named when it can be. A watcher
  thread ends the run from outside when a collective does not fail by itself (NCCL waits for its
  timeout), and SIGTERM (torchrun stopping the job) gives the run time to record its end.
* lrviz's collectives run in a process group of its own (gloo, CPU tensors), with its own timeout
  (``LRVIZ_DIST_TIMEOUT`` seconds): on a GPU an exchange costs one device-to-host copy, as a
  single-process run's flush does, and no per-step host sync. Values travel as JSON text, never pickled.

Why ~900 lines in one module: the rank's set-up (:class:`Distributed`), the step exchange, the fault
watcher, the followers' control and the data sharding are one protocol between ranks: each piece
assumes the others' message layout and timing, and they are changed together.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from .control import RunControl, Stopped, apply_commands
from .errors import ConfigError, LrvizError, ScriptError

log = logging.getLogger(__name__)

#: Seconds every collective lrviz adds may wait for the other ranks (env ``LRVIZ_DIST_TIMEOUT``).
DEFAULT_TIMEOUT_S = 120.0
#: The timeout of the process group lrviz initializes for torchrun (DDP's gradient reductions).
TRAINING_TIMEOUT_S = 600.0
#: Rank 0 aims for one exchange every this many seconds (the rows appear live, commands land)...
SYNC_S = 0.1
#: ...and at most this many steps apart.
MAX_INTERVAL = 256
#: A rank whose collective failed waits this long for the failing rank's message.
FAULT_WAIT_S = 3.0
#: When another rank reported a fault, this rank's run gets this long to end by itself (its collectives
#: fail when the failed rank's process exits) before it is ended from outside.
ABANDON_GRACE_S = 10.0
#: A failed rank waits this long for rank 0 to record its message before it exits (torchrun then
#: stops the others, rank 0 included).
RECORDED_WAIT_S = 15.0
#: Header of an exchange: magic, next agreed step, flags, command bytes, rows, step.
_HEADER = 6
_PAUSE, _STOP = 1, 2
#: Commands only rank 0 carries out (it keeps the checkpoints); the others pass over them.
_RANK0_ONLY = frozenset({"checkpoint"})
#: Words of a collective failure caused by another rank (gloo and NCCL say it in these words).
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "gloo", "nccl",
              "timed out", "process group", "processgroup", "c10d")


def timeout_s() -> float:
    """lrviz's collective timeout in seconds (``LRVIZ_DIST_TIMEOUT``, default DEFAULT_TIMEOUT_S)."""
    text = os.environ.get("LRVIZ_DIST_TIMEOUT")
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"LRVIZ_DIST_TIMEOUT must be a number of seconds > 0, not {text!r}")
    return value


def rank_of_process() -> int:
    """This process's rank in an initialized process group (0 without one)."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank()
    return 0


class Distributed:
    """This process's place in a distributed job, and lrviz's collectives among its ranks.

    Made by :meth:`from_env` (torchrun: lrviz initializes the process group) or :meth:`attach` (a
    group the user's loop initialized). Every collective method must be called by every rank at the
    same point of the loop.
    """

    def __init__(self, device: torch.device, *, owns_group: bool):
        self.rank = tdist.get_rank()
        self.world_size = tdist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.backend = str(tdist.get_backend())
        self.device = device
        self.owns_group = owns_group
        self.timeout = timeout_s()
        #: lrviz's own group: gloo, so its tensors stay on the CPU whatever the training backend.
        self.group = tdist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout))
        self.kv = _default_store()
        self.closed = False
        self.engine: Any = None
        self._watcher: FaultWatcher | None = None
        token = self.share(secrets.token_hex(6) if self.is_main else None)
        self.prefix = f"lrviz/{token}/"
        me = {"rank": self.rank, "device": str(device), "host": socket.gethostname(), "pid": os.getpid()}
        self.peers: list[dict[str, Any]] = self.gather(me)

    # ---- making one ----------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, device: str | None = "auto") -> Distributed:
        """Initialize the process group from torchrun's environment: NCCL on ``cuda:LOCAL_RANK`` when
        CUDA is there (and ``device`` is not ``cpu``), gloo on the CPU otherwise."""
        from .devices import resolve_device

        local = int(os.environ.get("LOCAL_RANK", "0"))
        choice = device or "auto"
        dev = resolve_device(choice)
        if dev.type == "cuda":
            if local >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPU(s): start at "
                                  "most that many processes a node (torchrun --nproc_per_node)")
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        elif dev.type == "mps":
            raise ConfigError("torch.distributed does not train on MPS; use --device cpu")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = timedelta(seconds=max(TRAINING_TIMEOUT_S, timeout_s()))
        try:
            try:
                kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
                tdist.init_process_group(backend, timeout=timeout, **kwargs)
            except TypeError:  # torch before 2.3 takes no device_id
                tdist.init_process_group(backend, timeout=timeout)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot join the torchrun job ({backend}): {exc}; if gloo cannot resolve this "
                              "host's name, set GLOO_SOCKET_IFNAME (e.g. lo on one machine)") from None
        return cls(dev, owns_group=True)

    @classmethod
    def attach(cls, device: torch.device) -> Distributed:
        """Join the process group the user's loop initialized (``lrviz.track``)."""
        return cls(device, owns_group=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """What the run's config records: world size, backend, every rank's device, the hosts."""
        hosts = sorted({p["host"] for p in self.peers})
        return {"world_size": self.world_size, "backend": self.backend,
                "devices": [p["device"] for p in self.peers], "hosts": hosts, "nodes": len(hosts)}

    def close(self) -> None:
        """Leave: stop watching for faults; destroy the process group when lrviz made it."""
        if self.closed:
            return
        self.closed = True
        if self._watcher is not None:
            self._watcher.stop()
        try:
            tdist.destroy_process_group(self.group)
            if self.owns_group:
                tdist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a group a fault already closed
            log.debug("destroying the process group failed", exc_info=True)

    # ---- collectives: rank 0's value to all, everyone's to all ------------------------------------------
    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` (JSON) on every rank (the others pass anything)."""
        data = json.dumps(value).encode() if self.is_main else b""
        return json.loads(self._broadcast_bytes(data).decode())

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (JSON), in rank order, on every rank."""
        data = json.dumps(value).encode()
        n = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        tdist.all_gather(sizes, n, group=self.group)
        longest = int(max(int(s) for s in sizes))
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else mine[:0]
        parts = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        tdist.all_gather(parts, mine, group=self.group)
        return [json.loads(bytes(p[:int(s)].numpy()).decode()) for p, s in zip(parts, sizes)]

    def agree(self, decide: Callable[[], Any]) -> Any:
        """Rank 0's ``decide()`` on every rank; when it raises an LrvizError, every rank raises it."""
        outcome: dict[str, Any] = {}
        own: LrvizError | None = None
        if self.is_main:
            try:
                outcome = {"value": decide()}
            except LrvizError as exc:
                own = exc
                outcome = {"error": str(exc)}
        outcome = self.share(outcome)
        if own is not None:
            raise own
        if "error" in outcome:
            raise ConfigError(outcome["error"])
        return outcome["value"]

    def load_checkpoint(self, path: str | Path, map_location: Any) -> dict[str, Any]:
        """A checkpoint every rank loads from rank 0's file (rank 0 reads it and sends the bytes: the
        other nodes need not see rank 0's disk)."""
        from . import checkpoint as ckpt

        data = b""
        error = None
        if self.is_main:
            try:
                data = ckpt.read_bytes(path)
            except LrvizError as exc:
                error = exc
        failed = self.share(str(error) if error is not None else None)
        if error is not None:
            raise error
        if failed is not None:
            raise ConfigError(failed)
        return ckpt.load_bytes(self._broadcast_bytes(data), path, map_location)

    def pick_checkpoint(self, pick: Callable[[], Any]) -> tuple[Any, Path]:
        """Rank 0's choice of a checkpoint (``pick()`` returns a CheckpointInfo): ``(info, path)`` there,
        ``(None, path)`` on the other ranks, which keep no checkpoints of their own."""
        chosen: list[Any] = []

        def decide() -> str:
            info = pick()
            chosen.append(info)
            return str(info.path)

        path = Path(self.agree(decide))
        return (chosen[0] if chosen else None), path

    def agree_validation(self, loss: float, accuracy: float | None) -> tuple[float, float | None]:
        """The validation figures every rank uses: the same on all ranks (each evaluates the whole
        validation data), or their mean when a ``build_data(rank=...)`` gave each rank its own part."""
        everyone = self.gather([_json_float(loss), accuracy])
        if all(v == everyone[0] for v in everyone):
            return loss, accuracy
        losses = [float(v[0]) if v[0] is not None else math.nan for v in everyone]
        accs = [v[1] for v in everyone]
        acc = float(np.mean(accs)) if all(a is not None for a in accs) else None
        return float(np.mean(losses)), acc

    def in_sync(self, params: Iterable[torch.Tensor]) -> bool:
        """Whether every rank's parameters are bit for bit identical (a digest of each rank's, compared)."""
        h = hashlib.blake2b(digest_size=16)
        for p in params:
            h.update(p.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
        return len({d for d in self.gather(h.hexdigest())}) == 1

    def _broadcast_bytes(self, data: bytes) -> bytes:
        n = torch.tensor([len(data)], dtype=torch.int64)
        tdist.broadcast(n, src=0, group=self.group)
        size = int(n)
        if not size:
            return b""
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.is_main else \
            torch.empty(size, dtype=torch.uint8)
        tdist.broadcast(buf, src=0, group=self.group)
        return bytes(buf.numpy())

    # ---- the model and the data ------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DistributedDataParallel (rank 0's weights are copied to every rank)."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def make_data(self, experiment: Any, batch_size: int | None, params: dict[str, Any] | None, *, seed: int,
                  epoch: Callable[[], int]) -> tuple[Any, Any]:
        """This rank's ``(train, val)``: ``build_data(rank=, world_size=)`` when it takes them (it shards
        by itself), else the training data sharded as :func:`shard` does. The validation data is not
        sharded: every rank evaluates all of it, so every rank has the same figure."""
        from .experiment import _accepted_kwargs

        place = {"rank": self.rank, "world_size": self.world_size}
        own = len(_accepted_kwargs(experiment.module.build_data, place)) == 2
        train, val = experiment.make_data(batch_size, params, extra=place if own else None)
        if not own:
            train = shard(train, self.rank, self.world_size, seed=seed, epoch=epoch, script=experiment)
        return train, val

    def staging(self, buffer: Any, device: torch.device | None, control: RunControl, *,
                check: Callable[[int, np.ndarray, np.ndarray], None], align: int | None = None) -> StepExchange:
        """The staging (and steering) of one loop on this rank: see :class:`StepExchange`."""
        return StepExchange(self, buffer, device, control, check=check, align=align)

    # ---- the points where the engine's loop calls in ------------------------------------------------------
    def begin(self, engine: Any) -> None:
        """Before the engine prepares: rank 0 sends the others what to build (they were built from it);
        on the other ranks the loop takes commands only from rank 0; another rank's fault ends the run."""
        self.engine = engine
        if self.is_main:
            send_plan(self, engine)
        else:
            engine.control = FollowerControl()
        engine.stage_on_device = True  # rows wait for the exchange, on any device
        self.watch(lambda fault: abandon(self, engine, fault))

    def prepared(self, engine: Any) -> None:
        """After the engine prepared (a fork's or resume's checkpoint loaded): the model in DDP, rank 0's
        interventions on every rank (a fork inherits its parent's from rank 0's store), the config's record."""
        from .interventions import Intervention

        engine._train_model = self.wrap(engine.model)
        pending = self.share([[it.step, it.kind, it.data] for it in engine._pending] if self.is_main else None)
        engine._pending = [Intervention(int(s), str(k), dict(d)) for s, k, d in pending]
        engine.config.distributed = self.describe()

    def ended(self, engine: Any) -> None:
        """At the end of a run every rank ended alike (not a failure): are all ranks' weights identical?"""
        if self.closed or str(engine.state) not in ("finished", "stopped", "diverged") or engine.model is None:
            return
        try:
            engine.ranks_in_sync = self.in_sync(engine.model.parameters())
        except RuntimeError as exc:
            log.warning("could not compare the ranks' parameters: %s", exc)
            return
        if not engine.ranks_in_sync:
            engine.rec.event("warning", {"kind": "ranks_out_of_sync", "message": "the ranks' parameters differ at "
                                         "the end of the run"}, engine.step)

    # ---- faults --------------------------------------------------------------------------------------
    def _key(self, name: str) -> str:
        return self.prefix + name

    def report(self, err: BaseException, *, close: bool = True) -> None:
        """This rank failed with ``err``: write its message for the others (the first report of the job
        is kept) and close the process groups, so that the others' collectives end now."""
        msg = {"rank": self.rank, "message": str(err), "path": getattr(err, "path", None),
               "line": getattr(err, "line", None), "detail": getattr(err, "detail", None)}
        if self.kv is not None:
            try:
                self.kv.compare_set(self._key("fault"), "", json.dumps(msg))
            except Exception:  # noqa: BLE001 - the store is torchrun's; it may be gone
                log.debug("could not report the fault", exc_info=True)
        if close:
            self._close_groups()

    def fault(self, wait: float = 0.0) -> dict[str, Any] | None:
        """The first fault a rank reported (``{rank, message, path, line, detail}``), waiting up to ``wait`` s."""
        if self.kv is None:
            return None
        deadline = time.monotonic() + wait
        key = self._key("fault")
        while True:
            try:
                if self.kv.check([key]):
                    return json.loads(self.kv.get(key).decode())
            except Exception:  # noqa: BLE001
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def failed(self, err: LrvizError) -> LrvizError:
        """What this rank's run failed with: another rank's message when a collective failed because of
        that rank (or a note of the rank that is gone), else ``err`` itself, reported to the others."""
        if not is_peer_loss(err):
            self.report(err)
            return err
        theirs = self.fault(wait=FAULT_WAIT_S)
        if theirs is not None and theirs.get("rank") != self.rank:
            return remote_error(theirs)
        gone = self.gone_ranks()
        who = ", ".join(f"rank {p['rank']} (pid {p['pid']} on {p['host']})" for p in gone) or "another rank"
        here = str(err).split(". This is typically")[0]  # gloo's advice repeats what this message says
        lost = LrvizError(f"{who} of this torchrun job ended without a message (killed, or out of memory?); "
                          f"its own output says why (rank {self.rank} saw: {here})")
        self.report(lost)
        return lost

    def gone_ranks(self) -> list[dict[str, Any]]:
        """The ranks on this host whose process no longer exists."""
        here = socket.gethostname()
        out = []
        for p in self.peers:
            if p["host"] != here or p["rank"] == self.rank:
                continue
            if not _alive(int(p["pid"])):
                out.append(p)
        return out

    def mark_recorded(self) -> None:
        """Rank 0 has saved the run's end: a failed rank may exit now."""
        if self.kv is not None:
            try:
                self.kv.set(self._key("recorded"), "1")
            except Exception:  # noqa: BLE001
                pass

    def wait_recorded(self, timeout: float = RECORDED_WAIT_S) -> bool:
        """Wait (bounded) until rank 0 has saved the run's end; True when it has."""
        if self.kv is None or self.is_main:
            return True
        try:
            self.kv.wait([self._key("recorded")], timedelta(seconds=timeout))
            return True
        except Exception:  # noqa: BLE001 - timed out, or the store is gone
            return False

    def watch(self, on_fault: Callable[[dict[str, Any]], None]) -> None:
        """Call ``on_fault`` (in a thread) when another rank reports a fault."""
        if self.kv is not None and self._watcher is None:
            self._watcher = FaultWatcher(self, on_fault)
            self._watcher.start()

    def _close_groups(self) -> None:
        """Close lrviz's group (and the training group when lrviz made it): the others' collectives fail at once."""
        try:
            tdist.destroy_process_group(self.group)
        except Exception:  # noqa: BLE001
            pass
        if self.owns_group:
            try:
                tdist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        self.closed = True


#: How long ``lrviz.track`` waits for every rank to call it too, before this rank records alone.
JOIN_S = 30.0
_joins = itertools.count()


def every_rank_tracks(timeout: float = JOIN_S) -> bool:
    """Whether every rank of the process group calls ``lrviz.track`` (this is the call), as the ranks
    must for steering; False when ``timeout`` s pass without them (a loop that tracks on rank 0 only).

    Decided once for all ranks through the job's store (the first rank to see all of them, or to give
    up, decides), so that a rank arriving late does not wait for a group the others never join.
    """
    kv = _default_store()
    if kv is None:
        return True
    n = next(_joins)
    count, decision = f"lrviz/track-{n}/count", f"lrviz/track-{n}/decision"
    world = tdist.get_world_size()
    seen = kv.add(count, 1)
    deadline = time.monotonic() + timeout
    while seen < world and time.monotonic() < deadline:
        time.sleep(0.05)
        seen = kv.add(count, 0)
    verdict = kv.compare_set(decision, "", "all" if seen >= world else "alone")
    return bytes(verdict) == b"all"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped by torchrun, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _default_store() -> Any:
    try:
        return tdist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a group made without a store: faults are then told less precisely
        return None


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


def is_peer_loss(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is a collective that failed because another rank left."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, getattr(tdist, "DistError", ())):
            return True
        if isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _PEER_LOST):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def remote_error(fault: dict[str, Any]) -> LrvizError:
    """The error another rank reported, naming the rank (and its script line, when it had one)."""
    r = fault.get("rank")
    if fault.get("path"):
        return ScriptError(f"rank {r}: {fault.get('detail') or fault.get('message')}", fault["path"], fault.get("line"))
    return LrvizError(f"rank {r}: {fault.get('message')}")


class FaultWatcher:
    """Polls the job's store for a fault another rank reported; calls ``on_fault`` once.

    The backstop for collectives that do not fail when a peer closes its groups (NCCL waits for its
    timeout): the process can then end the run itself.
    """

    POLL_S = 0.25

    def __init__(self, dist: Distributed, on_fault: Callable[[dict[str, Any]], None]):
        self.dist = dist
        self.on_fault = on_fault
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lrviz-dist-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.POLL_S):
            fault = self.dist.fault()
            if fault is not None and fault.get("rank") != self.dist.rank:
                try:
                    self.on_fault(fault)
                except Exception:  # noqa: BLE001
                    log.exception("handling another rank's fault failed")
                return


# ---- staging and steering: the exchange at agreed steps ---------------------------------------------------
class StepExchange:
    """The rows of one rank's loop, and rank 0's commands, exchanged among the ranks at agreed steps.

    Stands in for :class:`lrviz.staging.Staging` (``stage``, ``flush``, ``publish``) and for the loop's
    :class:`~lrviz.control.RunControl` in ``attend``: when a row brings the loop to the agreed step,
    it raises the control's ``attention`` flag, and the loop's next ``attend`` is the exchange. Rank 0
    takes its control's queued commands there and sends them; every rank applies them, in order,
    before the same step. ``flush`` (the end, a validation) is an exchange without commands; every rank
    calls it at the same step. ``publish`` (an error path) never waits on another rank: the rows not
    yet reduced are dropped, as they are no mean over ranks.
    """

    on_host = False

    def __init__(self, dist: Distributed, buffer: Any, device: torch.device | None, control: RunControl, *,
                 check: Callable[[int, np.ndarray, np.ndarray], None], align: int | None = None):
        self.dist = dist
        self.buffer = buffer
        self.control = control
        self.check = check
        self.align = align
        self.on_cpu = device is None or device.type == "cpu"
        self._nan = None if self.on_cpu else torch.full((), math.nan, device=device)
        self.next_step = buffer.first_step + buffer.n  # the step the next row records
        self.at = self.next_step  # the agreed step of the next exchange: the loop's first step
        self.last_flush = 0.0
        self.exchanges = 0
        self.heartbeat = min(5.0, dist.timeout / 4)
        self._rows: list[tuple[int, float, Any, Any, Any]] = []
        self._rate_at: tuple[int, float] | None = None
        control.attention = True

    # ---- per step: a few attribute reads, no host sync ------------------------------------------------------
    def stage(self, epoch: int, now: float, loss: torch.Tensor, gn2: torch.Tensor | None, lrs: Any) -> None:
        if self.on_cpu:
            self._rows.append((epoch, now, loss.item(), gn2.item() if gn2 is not None else math.nan, lrs))
        else:
            self._rows.append((epoch, now, loss.detach(), gn2.detach() if gn2 is not None else self._nan, lrs))
        self.next_step += 1
        if self.next_step >= self.at:
            self.control.attention = True
        return None

    def record_host(self, epoch: int, now: float, loss: torch.Tensor, gn2: torch.Tensor | None,
                    lrs: Any) -> tuple[float, float]:
        raise RuntimeError("a distributed run's rows are reduced among ranks: use stage()")

    # ---- at the same step on every rank ----------------------------------------------------------------------
    def flush(self, now: float) -> tuple[int, np.ndarray, np.ndarray] | None:
        """Reduce the rows recorded so far (every rank calls this at the same step); they are returned
        for the caller to check."""
        if not self._rows or self.dist.closed:
            return None
        words = [1.0, float(self.at), 0.0, 0.0] if self.dist.is_main else [0.0] * 4
        _, flushed = self._exchange(words)
        self.last_flush = now
        return flushed

    def publish(self, now: float) -> None:
        """An error path's flush: waits on nobody; drops the rows not yet reduced."""
        self._rows.clear()
        return None

    def attend(self, apply: Callable[[str, dict[str, Any]], dict[str, Any] | None], step: Callable[[], int], *,
               on_pause: Callable[[], None], on_resume: Callable[[], None],
               on_reject: Callable[[str, LrvizError], None]) -> None:
        """At the agreed step: exchange rows and commands, apply them, wait while paused (all ranks
        together), raise Stopped on stop. Before it (a command reached rank 0 between two agreed
        steps), nothing: the command waits for the agreed step."""
        s = step()
        control = self.control
        if s < self.at:
            control.attention = False
            return
        main = self.dist.is_main
        paused = False
        while True:
            queued: list[tuple[str, dict[str, Any], Any]] = control.take() if main else []
            words, queued = self._words(s, queued) if main else ([0.0] * 4, [])
            head, flushed = self._exchange(words)
            self.last_flush = time.perf_counter()
            if flushed is not None:
                self.check(*flushed)
            self.at = int(head[1])
            commands = queued if main else [(k, d, None) for k, d in self._commands(int(head[3]))]
            if main and head[3]:
                self.dist._broadcast_bytes(self._payload)
            apply_commands(commands, apply, step, on_reject, skip=_RANK0_ONLY if not main else frozenset())
            flags = int(head[2])
            if flags & _STOP:
                raise Stopped
            if not flags & _PAUSE:
                break
            if not paused:
                paused = True
                on_pause()
            if main:
                control.wait_while_paused(self.heartbeat)
        if paused:
            on_resume()
            self._rate_at = None

    def _words(self, s: int, queued: list[tuple[str, dict[str, Any], Any]]) -> tuple[list[float], list[Any]]:
        """Rank 0's header and the commands it sends (one that cannot travel is refused here)."""
        control = self.control
        sendable = []
        for kind, data, fut in queued:
            try:
                json.dumps({k: v for k, v in data.items() if k != "detection"})
            except (TypeError, ValueError):
                exc = ConfigError(f"{kind} is not available in a distributed run")
                if fut is not None:
                    fut.set_exception(exc)
                continue
            sendable.append((kind, data, fut))
        flags = (_PAUSE if control.pause_requested else 0) | (_STOP if control.stop_requested else 0)
        payload = json.dumps([[k, {x: v for x, v in d.items() if x != "detection"}] for k, d, _ in sendable])
        self._payload = payload.encode() if sendable else b""
        return [1.0, float(self._next_at(s)), float(flags), float(len(self._payload))], sendable

    def _next_at(self, s: int) -> int:
        """The next agreed step: about SYNC_S seconds on at the current step rate, at most MAX_INTERVAL
        steps; the next step during a step-once or while paused; never past a periodic checkpoint."""
        control = self.control
        now = time.perf_counter()
        last = self._rate_at
        self._rate_at = (s, now)
        if control.step_budget is not None or control.pause_requested or last is None or now <= last[1]:
            k = 1
        else:
            rate = (s - last[0]) / (now - last[1])
            k = max(1, min(MAX_INTERVAL, int(rate * SYNC_S)))
        at = s + k
        if self.align:
            at = min(at, (s // self.align + 1) * self.align)
        return at

    def _commands(self, size: int) -> list[tuple[str, dict[str, Any]]]:
        """Rank 0's commands (on another rank), when the header announced ``size`` bytes of them."""
        if not size:
            return []
        return [(str(k), dict(d)) for k, d in json.loads(self.dist._broadcast_bytes(b"").decode())]

    def _exchange(self, words: list[float]) -> tuple[np.ndarray, tuple[int, np.ndarray, np.ndarray] | None]:
        """One all-reduce: rank 0's header words, every rank's row count and step, every rank's losses
        and squared gradient norms (summed: divided by the world size, they are the means)."""
        rows = self._rows
        n = len(rows)
        header = [*words, float(n), float(self.next_step)]
        if self.on_cpu:
            t = torch.tensor(header + [r[2] for r in rows] + [r[3] for r in rows], dtype=torch.float64)
        elif n:
            staged = torch.stack([r[2] for r in rows] + [r[3] for r in rows]).to(torch.float64)
            t = torch.cat((torch.tensor(header, dtype=torch.float64), staged.cpu()))  # the one copy per exchange
        else:
            t = torch.tensor(header, dtype=torch.float64)
        tdist.all_reduce(t, group=self.dist.group)
        self.exchanges += 1
        v = t.numpy()
        world = self.dist.world_size
        if v[0] != 1.0 or v[4] != n * world or v[5] != self.next_step * world:
            raise LrvizError(f"internal error in lrviz: the ranks are out of step (rank {self.dist.rank} at step "
                             f"{self.next_step} with {n} rows; the sums say {v[5] / world:g} and {v[4] / world:g})")
        if not n:
            return v[:_HEADER], None
        loss = v[_HEADER:_HEADER + n] / world
        gn = np.sqrt(v[_HEADER + n:_HEADER + 2 * n] / world)
        buf = self.buffer
        i = buf.n
        epochs, times, _, _, lrs = zip(*rows)
        buf.write(i, epoch=epochs, time=times, loss=loss, grad_norm=gn, lr=lrs)
        buf.publish(i + n)
        rows.clear()
        return v[:_HEADER], (buf.first_step + i, loss, gn)


class FollowerControl(RunControl):
    """The control of a rank other than 0: it takes no commands (they come from rank 0 at the agreed
    steps); a pause or stop asked here (Ctrl+C in its terminal, the guard) is left to rank 0."""

    def signal(self, **flags: Any) -> None:
        return None

    def enqueue(self, kind: str, data: dict[str, Any], future: Any = None, state: Any = None) -> Any:
        if future is not None and not future.done():
            future.set_exception(ConfigError("this is not rank 0: steer the run through rank 0's endpoint"))
        return future


# ---- the training data of one rank --------------------------------------------------------------------
class EpochSampled:
    """A DataLoader with a DistributedSampler, reseeded with the run's epoch each time an epoch starts
    (as Lightning calls ``set_epoch``). Everything else is the loader's."""

    def __init__(self, loader: Any, sampler: Any, epoch: Callable[[], int]):
        self.loader = loader
        self.sampler = sampler
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        self.sampler.set_epoch(self.epoch())
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def shard(data: Any, rank: int, world_size: int, *, seed: int, epoch: Callable[[], int], script: Any = None) -> Any:
    """Rank ``rank``'s part of the training data ``data``, as Lightning shards it.

    A DataLoader gets a DistributedSampler in place of its sampler (shuffled when it shuffled, seeded
    with the run's seed, reseeded each epoch; padded so every rank has as many batches). A list of
    batches is dealt out (batch ``rank``, ``rank + world_size``...; each rank gets as many). Anything
    else is refused with a message: a ``build_data(rank=..., world_size=...)`` shards it by itself.
    """
    from torch.utils.data import (
        BatchSampler,
        DataLoader,
        DistributedSampler,
        IterableDataset,
        RandomSampler,
        SequentialSampler,
    )

    path = str(getattr(script, "path", "")) or None
    line = script.line_of("build_data") if script is not None else None
    own = ("; or let build_data shard it: def build_data(rank=0, world_size=1), and give each rank its own part "
           "(every rank must get as many batches)")
    if isinstance(data, EpochSampled):
        return data
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            raise ScriptError("under torchrun, the training DataLoader reads an IterableDataset, which lrviz cannot "
                              "give each rank a part of" + own, path, line)
        if isinstance(data.sampler, DistributedSampler):
            return data  # the script sharded it already
        custom_batches = data.batch_sampler is not None and type(data.batch_sampler) is not BatchSampler
        if custom_batches or not isinstance(data.sampler, (RandomSampler, SequentialSampler)):
            what = type(data.batch_sampler if custom_batches else data.sampler).__name__
            raise ScriptError(f"under torchrun, the training DataLoader has its own sampler ({what}), which lrviz "
                              "cannot give each rank a part of" + own, path, line)
        sampler = DistributedSampler(data.dataset, num_replicas=world_size, rank=rank,
                                     shuffle=isinstance(data.sampler, RandomSampler), seed=seed % (2**63),
                                     drop_last=data.drop_last)
        extra: dict[str, Any] = {}
        if data.num_workers > 0:
            extra = {"prefetch_factor": data.prefetch_factor, "persistent_workers": data.persistent_workers,
                     "multiprocessing_context": data.multiprocessing_context}
        loader = DataLoader(data.dataset, batch_size=data.batch_size, sampler=sampler, num_workers=data.num_workers,
                            collate_fn=data.collate_fn, pin_memory=data.pin_memory, drop_last=data.drop_last,
                            timeout=data.timeout, worker_init_fn=data.worker_init_fn, generator=data.generator,
                            **extra)
        return EpochSampled(loader, sampler, epoch)
    if isinstance(data, (list, tuple)):
        per = len(data) // world_size
        if per == 0:
            raise ScriptError(f"under torchrun with {world_size} ranks, the training data has {len(data)} batch(es): "
                              "fewer than one a rank", path, line)
        return list(data[rank::world_size][:per])
    raise ScriptError(f"under torchrun, lrviz gives each rank a part of a DataLoader or of a list of batches; the "
                      f"training data is a {type(data).__name__}" + own, path, line)


# ---- ``torchrun -m lrviz run/resume/replay``: the ranks other than 0 ----------------------------------------
def send_plan(dist: Distributed, engine: Any) -> None:
    """Rank 0: what the other ranks build their engine from (the script, the config, the origin)."""
    o = engine.origin
    origin = None if o is None else {"kind": o.kind, "run_id": o.run_id, "checkpoint": str(o.checkpoint),
                                      "step": o.step}
    dist.share({"script": str(engine.experiment.path), "config": engine.config.to_dict(), "origin": origin,
                "name": engine.name})


def follow(dist: Distributed) -> int:
    """A rank other than 0: build the engine rank 0 describes, train in step with it, return the exit status.

    Nothing is stored here and nothing is served; the run's interventions come from rank 0 too.
    """
    from .config import RunConfig
    from .engine import Origin, TrainingEngine
    from .experiment import load_experiment

    try:
        plan = dist.share(None)
    except RuntimeError as exc:
        theirs = dist.fault(wait=FAULT_WAIT_S)
        why = remote_error(theirs) if theirs is not None else f"rank 0 ended before training began ({exc})"
        print(f"lrviz: rank {dist.rank}: {why}", file=sys.stderr)
        return 1
    try:
        exp = load_experiment(plan["script"])
        o = plan.get("origin")
        origin = None if o is None else Origin(o["kind"], int(o["run_id"]), Path(o["checkpoint"]), int(o["step"]))
        engine = TrainingEngine(exp, RunConfig.from_dict(plan["config"]), None, origin=origin, name=plan.get("name"),
                                distributed=dist)
    except LrvizError as exc:
        dist.report(exc)
        print(f"lrviz: rank {dist.rank}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    return run_rank(dist, engine)


def run_rank(dist: Distributed, engine: Any) -> int:
    """Train ``engine`` on a rank other than 0 (Ctrl+C is left to rank 0); the exit status."""
    from .cli.common import train_headless

    train_headless(engine, quiet=True)
    state = str(engine.state)
    if state == "failed":  # exiting now closes this rank's connections: the others' collectives fail at once
        print(f"lrviz: rank {dist.rank}: error: {engine.error}", file=sys.stderr)
        return 1
    return 2 if state == "diverged" else 0


#: After SIGTERM (torchrun stopping the job: a rank failed, Ctrl+C, a batch system's time limit), the
#: run gets this long to end by itself; torchrun waits 30 s before SIGKILL.
TERM_GRACE_S = 20.0


@contextmanager
def terminable(dist: Distributed) -> Iterator[None]:
    """Inside the block (the main thread), SIGTERM stops the run instead of killing the process: rank 0
    asks a stop at the next agreed step (every rank then ends as stopped, the run saved); if the run
    has not ended within TERM_GRACE_S, it is recorded as failed and the process ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        engine = dist.engine
        if engine is not None and dist.is_main:
            engine.stop()
        fault = {"rank": dist.rank, "message": "this rank was sent SIGTERM and the run did not end by itself "
                 "(torchrun stops the job when a rank fails, on Ctrl+C, or at a batch system's time limit)"}
        timer = threading.Timer(TERM_GRACE_S, abandon, (dist, engine, fault, 0.0))
        timer.daemon = True
        timer.name = "lrviz-dist-term"
        timer.start()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def abandon(dist: Distributed, engine: Any, fault: dict[str, Any], grace: float = ABANDON_GRACE_S) -> None:
    """Another rank reported a fault: give this rank's engine ``grace`` seconds to end by itself (its
    collectives fail), then end the run here (rank 0 records the other rank's message) and the process."""
    if engine is not None and engine.done.wait(grace):
        return
    if engine is not None:
        engine.abandon(remote_error(fault))
    if dist.is_main:
        dist.mark_recorded()
    print(f"lrviz: rank {dist.rank}: {remote_error(fault)}", file=sys.stderr, flush=True)
    os._exit(1)
