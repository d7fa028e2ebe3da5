"""A desktop on Python's `websockets` over TLS: trusts only the CA in CA_FILE, pings
every second (giving up after a second without a pong), and counts events.

Usage: tls_stream_client.py URL CA_FILE COUNT
Prints {"ready": true, "cert_sha256": …} once connected, then one summary line
{"seqs": [...], "closed": null | "why"} after COUNT events (or a failure).
"""

import asyncio
import hashlib
import json
import ssl
import sys

import websockets


async def main(url, ca_file, count):
    context = ssl.create_default_context(cafile=ca_file)
    seqs, closed = [], None
    async with websockets.connect(url, ssl=context, ping_interval=1, ping_timeout=1) as socket:
        der = socket.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        print(json.dumps({"ready": True, "cert_sha256": hashlib.sha256(der).hexdigest()}), flush=True)
        try:
            while len(seqs) < count:
                frame = json.loads(await asyncio.wait_for(socket.recv(), timeout=20))
                if frame.get("topicName") != "channel.metadata":
                    seqs.append(frame["eventBody"]["seq"])
        except websockets.ConnectionClosed as error:
            closed = str(error)
        except asyncio.TimeoutError:
            closed = "timed out waiting for events"
    print(json.dumps({"seqs": seqs, "closed": closed}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
