// A Node app calling https:// with fetch through the proxy: undici's fetch (the one Node ships)
// with an undici ProxyAgent, as Node 20 apps do (Node >= 22 has NODE_USE_ENV_PROXY instead).
// Trust: NODE_EXTRA_CA_CERTS, as `sidecar inject` sets it (undici dials with Node's tls).
// Usage: node node_fetch_client.mjs METHOD URL  (proxy from HTTPS_PROXY; undici from
// $UNDICI_DIR, the project's Node peers). Prints status, then body.
import { createRequire } from "node:module";

const require = createRequire(`${process.env.UNDICI_DIR}/`);
const { fetch, ProxyAgent } = require("undici");

const [method, url] = process.argv.slice(2);
const body = method === "POST" ? JSON.stringify({ customer: "ACME", lines: [1, 2, 3] }) : undefined;
try {
  const res = await fetch(url, {
    method,
    body,
    headers: body ? { "content-type": "application/json" } : {},
    dispatcher: new ProxyAgent(process.env.HTTPS_PROXY),
  });
  console.log(res.status);
  console.log(await res.text());
} catch (err) {
  console.error(err.cause ? `${err.message}: ${err.cause.message}` : err.message);
  process.exit(1);
}
