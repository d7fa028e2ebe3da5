"""A real client of handover: Genesys' own Python SDK with its host set to the proxy
and no login, then the returned connectUri over the `websockets` library with an
RFC 6455 ping every second and a one-second pong timeout (as third-party Genesys
notification libraries configure it).

Usage: genesys_sdk_client.py PROXY_URL TOPIC COUNT
Prints {"ready": true} once subscribed and connected, then one JSON summary line.
"""

import asyncio
import json
import sys

import PureCloudPlatformClientV2 as genesys
import websockets


async def main(proxy_url: str, topic: str, count: int) -> None:
    api_client = genesys.ApiClient(host=proxy_url)
    notifications = genesys.NotificationsApi(api_client)

    channel = notifications.post_notifications_channels()
    notifications.head_notifications_channel(channel.id)
    wanted = genesys.ChannelTopic()
    wanted.id = topic
    answer = notifications.put_notifications_channel_subscriptions(channel.id, [wanted])
    subscribed = [t.id for t in answer.entities]
    listed = [t.id for t in notifications.get_notifications_channel_subscriptions(channel.id).entities]

    seqs = []
    other = []
    closed = None
    async with websockets.connect(channel.connect_uri, ping_interval=1, ping_timeout=1) as socket:
        print(json.dumps({"ready": True, "subscribed": subscribed, "listed": listed}), flush=True)
        try:
            while len(seqs) < count:
                frame = json.loads(await asyncio.wait_for(socket.recv(), timeout=20))
                if frame.get("topicName") == topic:
                    seqs.append(frame["eventBody"]["seq"])
                elif frame.get("topicName") != "channel.metadata":
                    other.append(frame)
        except websockets.ConnectionClosed as error:
            closed = str(error)
        except asyncio.TimeoutError:
            closed = "timed out waiting for events"
    print(json.dumps({"seqs": seqs, "other": other, "closed": closed, "expires": str(channel.expires)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
