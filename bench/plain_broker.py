"""fakeredis' TCP server as shipped: the benchmarks' anchor for the embedded broker."""

import sys

from fakeredis import TcpFakeServer

server = TcpFakeServer(("127.0.0.1", int(sys.argv[1])))
server.serve_forever()
