// A Node 20 app calling https:// through the proxy with an agent that sends CONNECT
// (Node 20 has no NODE_USE_ENV_PROXY). Trust: NODE_EXTRA_CA_CERTS, as `sidecar inject` sets it.
// Usage: node node_client.js METHOD URL  (proxy from HTTPS_PROXY). Prints status, then body.
"use strict";
const http = require("http");
const https = require("https");
const tls = require("tls");

class ConnectAgent extends https.Agent {
  constructor(proxy) {
    super({ keepAlive: false });
    this.proxy = new URL(proxy);
  }
  createConnection(options, callback) {
    const authority = `${options.host}:${options.port || 443}`;
    const req = http.request({
      host: this.proxy.hostname,
      port: this.proxy.port,
      method: "CONNECT",
      path: authority,
      headers: { host: authority },
    });
    req.on("connect", (res, socket) => {
      if (res.statusCode !== 200) {
        callback(new Error(`CONNECT answered ${res.statusCode}`));
        return;
      }
      const secure = tls.connect({ socket, servername: options.host, ALPNProtocols: ["http/1.1"] });
      secure.once("secureConnect", () => callback(null, secure));
      secure.once("error", callback);
    });
    req.on("error", callback);
    req.end();
  }
}

const [method, url] = process.argv.slice(2);
const body = method === "POST" ? JSON.stringify({ customer: "ACME", lines: [1, 2, 3] }) : null;
const req = https.request(
  url,
  {
    method,
    agent: new ConnectAgent(process.env.HTTPS_PROXY),
    headers: body ? { "content-type": "application/json", "content-length": Buffer.byteLength(body) } : {},
  },
  (res) => {
    const chunks = [];
    res.on("data", (c) => chunks.push(c));
    res.on("end", () => {
      console.log(res.statusCode);
      console.log(Buffer.concat(chunks).toString());
    });
  },
);
req.on("error", (err) => {
  console.error(err.message);
  process.exit(1);
});
if (body) req.write(body);
req.end();
