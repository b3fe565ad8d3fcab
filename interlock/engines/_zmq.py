"""`recv_multipart`: receiving from a pyzmq socket under trio, without a thread (the recipe of
reference/stack.md section 6), for every engine kind that speaks ZMQ."""

from __future__ import annotations

from typing import Any, cast

import trio
import zmq


async def recv_multipart(socket: zmq.Socket[Any]) -> list[bytes]:
    """Receive one multipart message from a pyzmq socket without blocking the trio thread.

    Waits (a trio checkpoint; cancellable) until a message is there and returns its frames.
    ``zmq.FD`` only signals edges, so after each miss ``zmq.EVENTS`` is re-read before waiting
    (reading it also processes the socket's pending commands, re-arming the edge). Raises
    ``zmq.ZMQError`` if the socket fails.
    """
    fd = cast(int, socket.getsockopt(zmq.FD))
    while True:
        try:
            frames = socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            if cast(int, socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                continue
            await trio.lowlevel.wait_readable(fd)
        else:
            # Yield once per message, so a busy feed cannot starve the tasks it feeds.
            await trio.lowlevel.checkpoint()
            return frames
