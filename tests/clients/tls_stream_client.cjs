// A desktop on Node's `ws` over TLS: trusts only the CA in CA_FILE and counts events.
//
// Usage: node tls_stream_client.cjs URL CA_FILE COUNT (NODE_PATH names where `ws` is)
// Prints {"ready": true, "cert_sha256": …} once connected, then one summary line
// {"seqs": [...], "closed": null | "why"} after COUNT events (or a failure).
const fs = require('fs');
const WebSocket = require('ws');

const [url, caFile, count] = process.argv.slice(2);
const ws = new WebSocket(url, { ca: fs.readFileSync(caFile) });
const seqs = [];
let done = false;
const finish = (closed) => {
  if (done) return;
  done = true;
  console.log(JSON.stringify({ seqs, closed }));
  ws.close(1000, 'done');
  setTimeout(() => process.exit(0), 500);
};
let idle = null;
const watchdog = () => {
  clearTimeout(idle);
  idle = setTimeout(() => finish('timed out waiting for events'), 20000);
};
ws.on('open', () => {
  const fingerprint = ws._socket.getPeerCertificate().fingerprint256.replace(/:/g, '').toLowerCase();
  console.log(JSON.stringify({ ready: true, cert_sha256: fingerprint }));
  watchdog();
});
ws.on('message', (data) => {
  const frame = JSON.parse(data.toString());
  if (frame.topicName !== 'channel.metadata') seqs.push(frame.eventBody.seq);
  watchdog();
  if (seqs.length >= Number(count)) finish(null);
});
ws.on('close', (code, reason) => finish(`closed ${code} ${reason}`));
ws.on('error', (error) => finish(`error: ${error.message}`));
