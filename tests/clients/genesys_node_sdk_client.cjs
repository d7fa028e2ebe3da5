// A real client of handover: Genesys' Node SDK (purecloud-platform-client-v2) pointed
// at the proxy with setGateway and no login, as the README shows, then the returned
// connectUri over Node's `ws`.
//
// Usage: node genesys_node_sdk_client.cjs PROXY_URL TOPIC COUNT
// Prints {"ready": true, …} once subscribed and connected, then one summary line.
const platformClient = require('purecloud-platform-client-v2');
const WebSocket = require('ws');

const [proxyUrl, topic, count] = process.argv.slice(2);
const proxy = new URL(proxyUrl);

(async () => {
  // ---- the README's Node SDK lines ----
  const client = platformClient.ApiClient.instance;
  client.setGateway({ host: proxy.hostname, protocol: 'http', port: Number(proxy.port) });
  const notifications = new platformClient.NotificationsApi();
  const available = await notifications.getNotificationsAvailabletopics();
  const channel = await notifications.postNotificationsChannels();
  await notifications.putNotificationsChannelSubscriptions(channel.id, [{ id: topic }]);
  const socket = new WebSocket(channel.connectUri);
  // ---- end ----
  // Listened for at once: the socket may open while the next call is in flight.
  const opened = new Promise((resolve) => socket.once('open', resolve));
  const listed = await notifications.getNotificationsChannelSubscriptions(channel.id);
  const seqs = [];
  const finish = (closed) => {
    console.log(JSON.stringify({ seqs, closed }));
    socket.close(1000, 'done');
    setTimeout(() => process.exit(0), 300);
  };
  socket.on('close', (code) => finish(`closed ${code}`));
  await opened;
  console.log(JSON.stringify({
    ready: true,
    available: available.entities.map((entity) => entity.id),
    listed: listed.entities.map((entity) => entity.id),
    expires: typeof channel.expires,
  }));
  socket.on('message', (data) => {
    const event = JSON.parse(data.toString());
    if (event.topicName === topic) seqs.push(event.eventBody.seq);
    if (seqs.length >= Number(count)) finish(null);
  });
})().catch((error) => {
  console.log(JSON.stringify({ error: String(error), body: error && error.body }));
  process.exit(1);
});
