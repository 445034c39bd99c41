// Closed-loop load from outside Python (issue 41): autocannon, CONNECTIONS connections, each sending one
// text per request and waiting for the answer, cycling through the texts of TEXTS_FILE (one per line),
// for SECONDS. Prints one JSON line: requests, requests/s, p50/p99 latency (ms), errors, non-2xx answers.
//   NODE_PATH=$(npm root -g) node benchmarks/autocannon_load.js URL TEXTS_FILE CONNECTIONS SECONDS
'use strict';
const autocannon = require('autocannon');
const fs = require('fs');

const [url, textsFile, connections, seconds] = process.argv.slice(2);
const bodies = fs.readFileSync(textsFile, 'utf8').split('\n').filter(Boolean)
  .map((text) => JSON.stringify({ inputs: text, truncate: true }));
let next = 0;
autocannon({
  url: `${url}/predict`, connections: Number(connections), duration: Number(seconds), method: 'POST',
  headers: { 'content-type': 'application/json' },
  requests: [{ setupRequest: (request) => ({ ...request, body: bodies[next++ % bodies.length] }) }],
}, (err, result) => {
  if (err) throw err;
  console.log(JSON.stringify({
    requests: result.requests.total, requests_per_s: +(result.requests.total / result.duration).toFixed(1),
    p50_ms: result.latency.p50, p99_ms: result.latency.p99, errors: result.errors, non_2xx: result.non2xx,
  }));
});
