"""P/D for simulated engines: vLLM 0.32 NixlConnector's contract without moving real KV.

Prefill side (kv_role kv_producer or kv_both): a request with `do_remote_decode: true` keeps its
blocks after it finishes, under a lease of `kv_lease_duration` seconds (30 by default), and its
response carries `kv_transfer_params` with exactly the keys vLLM 0.32 returns. A side channel
(ZMQ ROUTER on VLLM_NIXL_SIDE_CHANNEL_HOST:PORT, like vLLM's handshake listener) serves pulls.

Decode side (kv_consumer or kv_both): a request with `do_remote_prefill: true` and every field
vLLM requires pulls over the side channel; the prefill engine answers and frees the blocks, the
decode engine charges the transfer time. An unknown, expired or foreign request id is a failed
load: finish_reason "error" (HTTP 500) under kv_load_failure_policy "fail", a local prefill under
"recompute". Missing required fields make vLLM log "Got invalid KVTransferParams" and prefill
locally; the simulator does the same and counts it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from llmd.protocol.openai import NIXL_DECODE_REQUIRED
from llmd.runtime.tasks import cancel_tasks
from llmd.sim.engine import Engine, EngineError, RemotePrefill, SimRequest

log = logging.getLogger(__name__)

PULL_TIMEOUT_S = 5.0  # vLLM's handshake REQ socket uses RCVTIMEO 5000 ms
MAX_PEERS = 256

_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder().decode


class InvalidTransferParamsError(ValueError):
    """kv_transfer_params a decode leg cannot use (vLLM falls back to a local prefill)."""


def parse_decode_params(params: dict[str, Any] | None) -> RemotePrefill | None:
    """The remote prefill a decode leg asks for, or None when it asks for none.

    Raises EngineError for `do_remote_prefill` without `remote_block_ids` (real vLLM 0.32 hits an
    assertion and its engine dies; the simulator refuses the request loudly instead) and
    InvalidTransferParamsError when another required field is missing.
    """
    if not params or not params.get("do_remote_prefill"):
        return None
    if not params.get("remote_block_ids"):
        raise EngineError(
            "kv_transfer_params has do_remote_prefill=true but no remote_block_ids; real vLLM "
            "0.32 fails an assertion and its engine dies on this request",
            status=500,
            kind="InternalServerError",
        )
    missing = [k for k in NIXL_DECODE_REQUIRED if params.get(k) is None]
    if missing:
        raise InvalidTransferParamsError(f"missing {', '.join(missing)}")
    cached = params.get("remote_prefill_cached_tokens")
    return RemotePrefill(params=dict(params), remote_prefill_cached_tokens=cached)


@dataclass
class _Lease:
    request: SimRequest
    expires: float


class SimNixlConnector:
    """One engine's side of P/D: leases and the side channel (prefill), pulls (decode)."""

    def __init__(
        self,
        engine: Engine,
        ctx: zmq.asyncio.Context,
        *,
        role: str,
        engine_id: str | None = None,
        side_channel_host: str = "127.0.0.1",
        side_channel_port: int = 5600,
        lease_s: float = 30.0,
    ) -> None:
        self.engine = engine
        self._ctx = ctx
        self.role = role
        self.engine_id = engine_id or str(uuid.uuid4())
        self.host = side_channel_host
        self.port = side_channel_port
        self.lease_s = lease_s
        self.leases: dict[str, _Lease] = {}
        self._router: zmq.asyncio.Socket | None = None
        self._peers: OrderedDict[str, zmq.asyncio.Socket] = OrderedDict()
        self._pending: dict[bytes, asyncio.Future[list[Any]]] = {}
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._reader_tasks: dict[str, asyncio.Task[None]] = {}
        self.invalid_params = 0
        if self.produces:
            engine.on_finished = self._hold
        if self.consumes:
            engine.pull = self._pull

    @property
    def produces(self) -> bool:
        return self.role in ("kv_producer", "kv_both")

    @property
    def consumes(self) -> bool:
        return self.role in ("kv_consumer", "kv_both")

    async def start(self) -> None:
        if self.produces:
            router = self._ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.bind(f"tcp://{self.host}:{self.port}")
            self._router = router
            self._tasks.append(asyncio.create_task(self._serve(), name="nixl-side-channel"))
            self._tasks.append(asyncio.create_task(self._reap(), name="nixl-lease-reaper"))

    async def close(self) -> None:
        await cancel_tasks(*self._tasks, *self._reader_tasks.values())
        if self._router is not None:
            self._router.close(linger=0)
        for sock in self._peers.values():
            sock.close(linger=0)
        self._peers.clear()

    # -- prefill side -----------------------------------------------------------------------

    def _hold(self, req: SimRequest) -> bool:
        if not req.do_remote_decode:
            return False
        self.leases[req.request_id] = _Lease(req, self.engine.clock.now() + self.lease_s)
        req.kv_transfer_params = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [[b.block_id for b in req.blocks]],
            "remote_engine_id": self.engine_id,
            "remote_request_id": req.request_id,
            "remote_host": self.host,
            "remote_port": self.port,
            "tp_size": 1,
            "dcp_size": 1,
            "pp_size": 1,
            "remote_num_tokens": req.num_computed,
            "remote_blocks_expiry_time": None,
            "transfer_mode": "pull",
            "remote_prefill_cached_tokens": req.cached_tokens,
        }
        return True

    def _release(self, lease: _Lease) -> None:
        self.engine.pool.free(lease.request.blocks)
        lease.request.blocks = []
        self.engine.wake()

    async def _serve(self) -> None:
        assert self._router is not None
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) != 3:
                log.warning("side channel: %d frames ignored", len(frames))
                continue
            identity, corr, payload = frames
            try:
                msg = _unpack(payload)
                kind, request_id, engine_id = msg[0], str(msg[1]), str(msg[2])
            except (msgspec.DecodeError, IndexError, TypeError):
                await self._router.send_multipart([identity, corr, _pack(["ERR", "bad message"])])
                continue
            reply: list[Any]
            if kind != "PULL":
                reply = ["ERR", f"unknown message {kind!r}"]
            elif engine_id != self.engine_id:
                reply = ["ERR", f"engine id {engine_id} is not {self.engine_id}"]
            elif (lease := self.leases.pop(request_id, None)) is None:
                reply = ["ERR", f"request {request_id} unknown or its KV lease expired"]
            else:
                self._release(lease)
                reply = ["OK", lease.request.num_computed]
            await self._router.send_multipart([identity, corr, _pack(reply)])

    async def _reap(self) -> None:
        while True:
            await self.engine.clock.sleep(1.0)
            now = self.engine.clock.now()
            for request_id, lease in list(self.leases.items()):
                if lease.expires <= now:
                    del self.leases[request_id]
                    self._release(lease)
                    self.engine.metrics.nixl_expired += 1
                    log.info("Releasing expired KV blocks for request %s", request_id)

    # -- decode side ------------------------------------------------------------------------

    def _peer(self, host: str, port: int) -> zmq.asyncio.Socket:
        key = f"tcp://{host}:{port}"
        sock = self._peers.get(key)
        if sock is not None:
            self._peers.move_to_end(key)
            return sock
        if len(self._peers) >= MAX_PEERS:
            old_key, old = self._peers.popitem(last=False)
            task = self._reader_tasks.pop(old_key, None)
            if task is not None:
                task.cancel()
            old.close(linger=0)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(key)
        self._peers[key] = sock
        self._reader_tasks[key] = asyncio.create_task(self._read(sock), name=f"nixl-peer-{key}")
        return sock

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 2:
                continue
            fut = self._pending.pop(frames[0], None)
            if fut is not None and not fut.done():
                try:
                    fut.set_result(list(_unpack(frames[1])))
                except msgspec.DecodeError:
                    fut.set_result(["ERR", "undecodable reply"])

    async def _pull(self, req: SimRequest) -> str | None:
        assert req.remote is not None
        p = req.remote.params
        try:
            sock = self._peer(str(p["remote_host"]), int(p["remote_port"]))
        except (ValueError, TypeError, zmq.ZMQError) as exc:
            return f"cannot reach {p.get('remote_host')}:{p.get('remote_port')}: {exc}"
        corr = next(self._ids).to_bytes(8, "big")
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._pending[corr] = fut
        msg = ["PULL", str(p["remote_request_id"]), str(p["remote_engine_id"])]
        try:
            await sock.send_multipart([corr, _pack(msg)])
            reply = await asyncio.wait_for(fut, PULL_TIMEOUT_S)
        except TimeoutError:
            return f"no answer from {p['remote_host']}:{p['remote_port']} in {PULL_TIMEOUT_S}s"
        finally:
            self._pending.pop(corr, None)
        if reply and reply[0] == "OK":
            return None
        return str(reply[1]) if len(reply) > 1 else "refused"
