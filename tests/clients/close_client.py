"""A WebSocket client on Python's `websockets`, reporting the close code it sees.

Usage: close_client.py URL MODE
  client-close   wait for the first frame (or 1 s), close with 1000, report
  server-close   read until the server closes, report
  slow SECONDS   read nothing for SECONDS, then read until the server closes, report

Prints one JSON line: {"code": int, "reason": str, "frames": n}. A code of 1006
means no Close frame was received (the handshake was not completed).
"""

import asyncio
import json
import sys

import websockets


async def main(url, mode, arg):
    frames = 0
    # A client that stops reading cannot see its own keep-alive pongs: in slow mode it
    # sends no pings, or it would give up on the connection itself.
    keepalive = None if mode == "slow" else 1
    async with websockets.connect(url, ping_interval=keepalive, ping_timeout=keepalive, max_queue=16) as ws:
        if mode == "client-close":
            try:
                await asyncio.wait_for(ws.recv(), 1)
                frames += 1
            except asyncio.TimeoutError:
                pass
            await ws.close(code=1000, reason="bye")
        else:
            if mode == "slow":
                await asyncio.sleep(float(arg))
            try:
                while True:
                    await ws.recv()
                    frames += 1
            except websockets.ConnectionClosed:
                pass
        await ws.wait_closed()
        print(json.dumps({"code": ws.close_code, "reason": ws.close_reason or "", "frames": frames}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
