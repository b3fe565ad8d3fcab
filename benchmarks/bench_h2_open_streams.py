"""What a new stream costs the ext_proc transport's h2 with many streams open: h2's own
`H2Connection` (the baseline) against the transport's `_H2Connection`, in the same run.

h2 checks MAX_CONCURRENT_STREAMS at each new stream by walking every stream it holds; the
transport's subclass counts without the walk (see `_H2Connection.open_inbound_streams`). Each
case opens ``--open`` streams on a server-side connection, then feeds it ``-n`` new streams, one
HEADERS per read (as requests arrive one by one), and times those reads (the new streams stay
open too: a case with 0 open ends with ``-n`` open). It prints the time per new stream of
each and the ratio of the transport's to h2's.

    python benchmarks/bench_h2_open_streams.py [-n 1000] [--open 0,1000,20000]
"""

from __future__ import annotations

import argparse
import time

import h2.config
import h2.connection
import h2.settings

from interlock.gateway import _grpc

_HEADERS = [(b":method", b"POST"), (b":path", b"/echo"), (b":scheme", b"http"),
            (b":authority", b"a")]  # fmt: skip


def per_new_stream(cls: type[h2.connection.H2Connection], open_: int, new: int) -> float:
    """Seconds per new stream for ``cls`` with ``open_`` streams open."""
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    server = cls(_grpc._CONFIG)
    server.local_settings = h2.settings.Settings(
        client=False,
        initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1 << 20},
    )
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())  # the SETTINGS acknowledged both ways
    for _ in range(open_):
        client.send_headers(client.get_next_available_stream_id(), _HEADERS)
    server.receive_data(client.data_to_send())
    reads = []
    for _ in range(new):
        client.send_headers(client.get_next_available_stream_id(), _HEADERS, end_stream=True)
        reads.append(client.data_to_send())
    start = time.perf_counter()
    for data in reads:
        server.receive_data(data)
    return (time.perf_counter() - start) / new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1000, help="new streams timed per case")
    parser.add_argument("--open", default="0,1000,20000", help="streams open, per case")
    args = parser.parse_args()
    for open_ in (int(value) for value in args.open.split(",")):
        base = per_new_stream(h2.connection.H2Connection, open_, args.n)
        ours = per_new_stream(_grpc._H2Connection, open_, args.n)
        print(
            f"{open_:>6} open: h2 {base * 1e6:8.1f} us per new stream, "
            f"the transport's {ours * 1e6:8.1f} us, ratio {ours / base:.3f}"
        )


if __name__ == "__main__":
    main()
