// Drives the emulator with the real jsforce client (npm `jsforce` 3).
// Usage: node client.js http://127.0.0.1:PORT
// jsforce takes any login URL, so nothing is adapted: OAuth password grant, then create,
// upsert on the external id, retrieve, SOQL query, and the error it raises for a bad field.
const jsforce = require('jsforce');

const url = process.argv[2];
let checks = 0;
function check(name, cond, detail) {
  if (!cond) {
    console.error(`FAIL ${name}: ${JSON.stringify(detail)}`);
    process.exit(1);
  }
  checks += 1;
}

(async () => {
  const conn = new jsforce.Connection({
    oauth2: { loginUrl: url, clientId: 'edgecase-client-id', clientSecret: 'edgecase-client-secret' },
    version: '58.0',
  });
  const info = await conn.login('integration@edgecase.example', 'passwordTOKEN');
  check('login gives the user and org', info.id.startsWith('005') && info.organizationId.startsWith('00D'), info);
  check('instance URL is the emulator', conn.instanceUrl === url, conn.instanceUrl);

  const created = await conn.sobject('Case').create({ Subject: 'from jsforce', Origin: 'Web' });
  check('create succeeds', created.success === true && created.id.startsWith('500'), created);

  const first = await conn.sobject('Case').upsert({ Subject: 'js upsert', Edge_Event_Id__c: 'js-event-1' }, 'Edge_Event_Id__c');
  check('first upsert creates', first.success === true && first.created === true, first);
  const second = await conn.sobject('Case').upsert({ Priority: 'High', Edge_Event_Id__c: 'js-event-1' }, 'Edge_Event_Id__c');
  check('second upsert updates', second.success === true && second.created === false, second);

  const got = await conn.sobject('Case').retrieve(created.id);
  check('retrieve returns the fields', got.Subject === 'from jsforce' && got.Status === 'New', got);

  const res = await conn.query("SELECT Id, Subject, Priority FROM Case WHERE Edge_Event_Id__c = 'js-event-1'");
  check('query finds one record', res.totalSize === 1 && res.records[0].Priority === 'High', res);

  try {
    await conn.sobject('Case').create({ Nope__c: 'x' });
    check('unknown field is refused', false, null);
  } catch (e) {
    check('unknown field -> INVALID_FIELD', e.errorCode === 'INVALID_FIELD' || e.name === 'INVALID_FIELD', { name: e.name, code: e.errorCode, message: e.message });
  }
  try {
    const bad = new jsforce.Connection({
      oauth2: { loginUrl: url, clientId: 'edgecase-client-id', clientSecret: 'edgecase-client-secret' },
    });
    await bad.login('integration@edgecase.example', 'wrongTOKEN');
    check('wrong password is refused', false, null);
  } catch (e) {
    check('wrong password -> invalid_grant', String(e.name).includes('invalid_grant') || String(e.message).includes('authentication failure'), { name: e.name, message: e.message });
  }
  console.log(`jsforce against the emulator: ${checks} checks passed`);
})().catch((e) => {
  console.error(`FAIL: ${e.name}: ${e.message}`);
  process.exit(1);
});
