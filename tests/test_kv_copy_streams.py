"""KV moves on CUDA: a copy to host waits for the compute queued before it without holding up the
server's loop, and a restore does not wait for that compute at all."""

from __future__ import annotations

import asyncio

import pytest
import torch

from djinn.client import connect
from tests.serving import serving_config, start_server

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="copy streams need a CUDA device")

#: GPU cycles of the stand-in for queued model steps: about a second, against copies of microseconds
QUEUED_COMPUTE_CYCLES = 2_000_000_000


def test_a_restore_overtakes_queued_compute_and_a_copy_to_host_leaves_the_loop_free():
    server = start_server(serving_config())
    try:
        with connect(server.url("tcp")) as client:
            session = client.model().session()
            session.generate([5, 6, 7], max_new_tokens=4)
            model = server.kernel.backend
            kv = server.call(lambda: server.kernel.get(session.id).kv)

            async def moves() -> dict[str, bool]:
                # a second KV of the same capacity, evicted: the restore target
                other = model.new_kv()
                other.ensure_capacity(kv.capacity)
                other.release(keep_capacity=True)
                to_host = torch.zeros(kv.nbytes, dtype=torch.uint8).pin_memory()
                from_host = torch.ones(other.nbytes, dtype=torch.uint8).pin_memory()
                compute = torch.cuda.default_stream(model.device)
                # once each way first: the copy streams' first allocations are device allocations,
                # which wait for the whole device (a server pays them once, at its first moves)
                await model.copy_out(kv, to_host)
                await model.copy_in(other, from_host)
                other.release(keep_capacity=True)
                torch.cuda._sleep(QUEUED_COMPUTE_CYCLES)  # on the default stream, as the model's steps
                copy_out = asyncio.ensure_future(model.copy_out(kv, to_host))
                await asyncio.sleep(0)  # the copy to host is queued and waiting for the compute
                loop_ran = not compute.query()
                await model.copy_in(other, from_host)
                seen = {"loop_ran_while_compute_queued": loop_ran,
                        "restore_done_before_compute": not compute.query(),
                        "copy_to_host_waits_for_compute": not copy_out.done()}
                await copy_out
                seen["copy_to_host_done_after_compute"] = compute.query()
                other.release()
                return seen

            seen = server.spawn(moves()).result(timeout=60)
            assert seen == {"loop_ran_while_compute_queued": True, "restore_done_before_compute": True,
                            "copy_to_host_waits_for_compute": True, "copy_to_host_done_after_compute": True}
            session.close()
    finally:
        server.stop()
