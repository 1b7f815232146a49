"""asyncio over IPsec channels: a server and a client whose peers are IKE identities.

    python3 examples/asyncio_echo.py serve ADDR PORT
    python3 examples/asyncio_echo.py client ADDR PORT MESSAGE

The server hands asyncio a latched listening socket (start_server(sock=...)); the client
hands it a latched connected socket (open_connection(sock=...)). The latch is read through
the transport's socket with getsockopt, as any socket option; a broken latch ends the
connection with LatchBrokenError (connection_lost).
"""
import asyncio
import json
import sys

from ipsecchan import socket


def peer_of(writer) -> str:
    sock = writer.get_extra_info("socket")
    return sock.getsockopt(socket.SOL_IPSEC, socket.IPSEC_PEER_ID, 256).decode()


async def serve(addr: str, port: int) -> None:
    async def echo(reader, writer):
        data = await reader.readline()
        writer.write(f"{peer_of(writer)} said {data.decode().strip()}\n".encode())
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    srv = await asyncio.start_server(echo, sock=socket.create_server((addr, port)))
    print(json.dumps({"listening": [addr, port]}), flush=True)
    async with srv:
        await srv.serve_forever()


async def client(addr: str, port: int, message: str) -> None:
    sock = socket.create_connection((addr, port), timeout=10)
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(message.encode() + b"\n")
    await writer.drain()
    reply = (await reader.readline()).decode().strip()
    print(json.dumps({"server_id": peer_of(writer), "reply": reply}))
    writer.close()
    await writer.wait_closed()


if __name__ == "__main__":
    cmd, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    asyncio.run(serve(addr, port) if cmd == "serve" else client(addr, port, sys.argv[4]))
