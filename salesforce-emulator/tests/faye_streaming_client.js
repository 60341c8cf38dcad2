// Drives the emulator's Streaming API with faye, the Bayeux client jsforce uses for
// Salesforce streaming: OAuth password grant, PushTopic created over REST, Cases created and
// updated over REST, events received over long-polling with the replay extension.
// Usage: node faye_streaming_client.js EMULATOR_URL   (prints one JSON line per step)
'use strict';
const faye = require('faye');

const base = process.argv[2];
const V = '58.0';
const fail = (msg) => { console.error('FAIL: ' + msg); process.exit(1); };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function login() {
  const body = new URLSearchParams({
    grant_type: 'password', client_id: 'edgecase-client-id', client_secret: 'edgecase-client-secret',
    username: 'integration@edgecase.example', password: 'passwordTOKEN',
  });
  const r = await fetch(base + '/services/oauth2/token', { method: 'POST', body });
  if (r.status !== 200) fail('login: ' + r.status + ' ' + await r.text());
  return (await r.json()).access_token;
}

async function rest(token, method, path, body) {
  const r = await fetch(base + '/services/data/v' + V + path, {
    method, headers: { Authorization: 'Bearer ' + token, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  if (r.status >= 300) fail(method + ' ' + path + ': ' + r.status + ' ' + text);
  return text ? JSON.parse(text) : null;
}

// A faye client with the Salesforce replay extension: `replay` maps channel -> replay id.
function client(token, replay) {
  const c = new faye.Client(base + '/cometd/' + V, { timeout: 10 });
  c.setHeader('Authorization', 'OAuth ' + token);
  c.disable('websocket');
  c.addExtension({
    outgoing(msg, cb) {
      if (msg.channel === '/meta/subscribe') msg.ext = { replay };
      cb(msg);
    },
  });
  return c;
}

// Subscribes and collects events until `n` arrived (or the time runs out).
async function collect(c, channel, n, during) {
  const got = [];
  const sub = c.subscribe(channel, (m) => got.push(m));
  await new Promise((resolve, reject) => sub.then(resolve, reject));
  if (during) await during();
  for (let i = 0; i < 100 && got.length < n; i++) await sleep(100);
  return got;
}

(async () => {
  const token = await login();
  const topic = await rest(token, 'POST', '/sobjects/PushTopic/', {
    Name: 'FayeCases', Query: "SELECT Id, Subject, Status FROM Case WHERE Priority = 'High'",
    ApiVersion: 58.0, NotifyForOperationCreate: true, NotifyForOperationUpdate: true,
    NotifyForOperationDelete: false, NotifyForOperationUndelete: false, NotifyForFields: 'Referenced',
  });
  const found = await rest(token, 'GET', "/query?q=" + encodeURIComponent("SELECT Id, Name FROM PushTopic WHERE Name = 'FayeCases'"));
  if (found.totalSize !== 1 || found.records[0].Id !== topic.id) fail('PushTopic query: ' + JSON.stringify(found));
  // Before any subscriber: retained, replayed with -2.
  const a = await rest(token, 'POST', '/sobjects/Case/', { Subject: 'A', Priority: 'High' });

  const c1 = client(token, { '/topic/FayeCases': -2 });
  const first = await collect(c1, '/topic/FayeCases', 4, async () => {
    const b = await rest(token, 'POST', '/sobjects/Case/', { Subject: 'B', Priority: 'High' });
    await rest(token, 'POST', '/sobjects/Case/', { Subject: 'low', Priority: 'Low' }); // WHERE: no event
    await rest(token, 'PATCH', '/sobjects/Case/' + b.id, { Description: 'not referenced' }); // no event
    await rest(token, 'PATCH', '/sobjects/Case/' + b.id, { Status: 'Working' });
    await rest(token, 'POST', '/sobjects/Case/', { Subject: 'C', Priority: 'High' });
  });
  await c1.disconnect();
  const seen = first.map((m) => [m.event.type, m.sobject.Subject, m.sobject.Status, m.event.replayId]);
  console.log(JSON.stringify({ step: 'replay -2 then live', events: seen }));
  const expect = [['created', 'A', 'New'], ['created', 'B', 'New'], ['updated', 'B', 'Working'], ['created', 'C', 'New']];
  if (seen.length !== 4) fail('expected 4 events, got ' + JSON.stringify(seen));
  expect.forEach((e, i) => { if (seen[i][0] !== e[0] || seen[i][1] !== e[1] || seen[i][2] !== e[2]) fail('event ' + i + ': ' + JSON.stringify(seen[i])); });
  if (first[0].sobject.Id !== a.id) fail('sobject Id');
  if (Object.keys(first[0].sobject).sort().join() !== 'Id,Status,Subject') fail('sobject holds exactly the SELECT fields: ' + JSON.stringify(first[0].sobject));
  for (let i = 1; i < seen.length; i++) if (!(seen[i][3] > seen[i - 1][3])) fail('replay ids must increase');

  // Resume after the second event: the third and fourth come again, nothing else.
  const c2 = client(token, { '/topic/FayeCases': seen[1][3] });
  const resumed = await collect(c2, '/topic/FayeCases', 2);
  await sleep(300);
  await c2.disconnect();
  const rs = resumed.map((m) => m.event.replayId);
  console.log(JSON.stringify({ step: 'resume after ' + seen[1][3], replayIds: rs }));
  if (rs.join() !== [seen[2][3], seen[3][3]].join()) fail('resume: ' + JSON.stringify(rs));

  // A replay id that was never retained is refused with Salesforce's message.
  const c3 = client(token, { '/topic/FayeCases': 987654 });
  const err = await new Promise((resolve) => c3.subscribe('/topic/FayeCases', () => {}).then(() => resolve(null), (e) => resolve(e)));
  await c3.disconnect();
  console.log(JSON.stringify({ step: 'invalid replay id', error: err && err.message }));
  if (!err || !/replayId \{?987654\}? you provided was invalid/.test(err.message)) fail('invalid replay id accepted: ' + JSON.stringify(err));

  // A channel with no PushTopic.
  const c4 = client(token, {});
  const err2 = await new Promise((resolve) => c4.subscribe('/topic/Nope', () => {}).then(() => resolve(null), (e) => resolve(e)));
  await c4.disconnect();
  console.log(JSON.stringify({ step: 'missing channel', error: err2 && err2.message }));
  if (!err2 || !/does not exist/.test(err2.message)) fail('missing channel accepted');
  console.log('OK');
  process.exit(0);
})().catch((e) => fail(e && e.stack || String(e)));
