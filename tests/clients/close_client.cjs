// A WebSocket client on Node's `ws`, reporting the close code it sees.
//
// Usage: node close_client.cjs URL MODE (with NODE_PATH naming where `ws` is)
//   client-close   wait for the first frame (or 1 s), close with 1000, report
//   server-close   read until the server closes, report
//   slow SECONDS   read nothing for SECONDS (the socket is paused), then read until
//                  the server closes, report
//
// Prints one JSON line: {"code": n, "reason": "…", "frames": n}. A code of 1006 means
// no Close frame was received (the handshake was not completed).
const WebSocket = require('ws');

const [url, mode, arg] = process.argv.slice(2);
const ws = new WebSocket(url);
let frames = 0;
ws.on('message', () => { frames += 1; });
ws.on('close', (code, reason) => {
  console.log(JSON.stringify({ code, reason: reason.toString(), frames }));
  process.exit(0);
});
ws.on('error', () => {});
ws.on('open', () => {
  if (mode === 'client-close') {
    const bye = () => ws.close(1000, 'bye');
    const timer = setTimeout(bye, 1000);
    ws.once('message', () => { clearTimeout(timer); bye(); });
  } else if (mode === 'slow') {
    ws.pause();
    setTimeout(() => ws.resume(), Number(arg) * 1000);
  }
});
