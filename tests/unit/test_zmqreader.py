"""BatchReader: input is never left unread because something looked at the socket's state."""

from __future__ import annotations

import asyncio
import time

import zmq
import zmq.asyncio

from gateway.zmqreader import BatchReader


async def test_looking_for_input_does_not_swallow_the_wake_up() -> None:
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    got: list[bytes] = []
    arrived = asyncio.Event()

    def drain() -> bool:
        while True:
            try:
                got.append(reader.sock.recv_multipart(zmq.NOBLOCK)[1])
            except zmq.Again:
                arrived.set()
                return False

    reader = BatchReader(router, drain)
    task = asyncio.create_task(reader.run())
    try:
        await asyncio.sleep(0)  # the reader now waits on the descriptor
        dealer.send(b"hello")
        # Without yielding to the loop, look until the message is there: reading the
        # state consumes the descriptor's edge, so the waiting reader is never woken
        # unless has_input() schedules the drain itself.
        for _ in range(10_000):
            if reader.has_input():
                break
            time.sleep(0.001)  # blocks the loop on purpose; libzmq's I/O thread delivers
        else:
            raise AssertionError("the message never arrived")
        await asyncio.wait_for(arrived.wait(), 2)
        assert got == [b"hello"]
    finally:
        task.cancel()
        dealer.close(linger=0)
        router.close(linger=0)
        ctx.term()
