"""Drives the emulator with the real simple-salesforce client (PyPI `simple-salesforce`).

Usage: python3 simple_salesforce_client.py http://127.0.0.1:PORT PRIVATE_KEY_PEM

simple-salesforce always talks https to `<domain>.salesforce.com` and to the instance it
was given; the only adaptation here is the transport: a requests.Session that sends those
URLs to the emulator over plain http. Paths, headers, bodies and the parsing of answers are
the client's own. Exits non-zero on the first mismatch.
"""
import sys
from urllib.parse import urlsplit, urlunsplit

import requests
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import (
    SalesforceAuthenticationFailed,
    SalesforceExpiredSession,
    SalesforceMalformedRequest,
    SalesforceResourceNotFound,
)

EMULATOR = sys.argv[1]
KEY_FILE = sys.argv[2]
TARGET = urlsplit(EMULATOR).netloc
USER = "integration@edgecase.example"
CHECKS = []


class ToEmulator(requests.Session):
    def request(self, method, url, *args, **kwargs):
        parts = urlsplit(url)
        if parts.hostname in ("login.salesforce.com", "test.salesforce.com") or parts.netloc == TARGET:
            url = urlunsplit(("http", TARGET, parts.path, parts.query, parts.fragment))
        return super().request(method, url, *args, **kwargs)


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}", file=sys.stderr)
        sys.exit(1)
    CHECKS.append(name)


# 1. OAuth username-password grant: with a consumer key and secret and the security token
# appended to the password, simple-salesforce uses the token endpoint (with a separate
# security_token argument it would use the SOAP login, which the emulator does not serve).
sf = Salesforce(
    username=USER,
    password="passwordTOKEN",
    consumer_key="edgecase-client-id",
    consumer_secret="edgecase-client-secret",
    session=ToEmulator(),
)
check("password login gives a session", sf.session_id.startswith("00D"), sf.session_id)

# 2. Create.
created = sf.Case.create({"Subject": "from simple-salesforce", "Origin": "Web"})
check("create answers success", created["success"] is True and created["errors"] == [], created)
check("create gives a Case id", created["id"].startswith("500") and len(created["id"]) == 18, created)
got = sf.Case.get(created["id"])
check("get returns the fields", got["Subject"] == "from simple-salesforce" and got["Status"] == "New", got)
check("get carries attributes", got["attributes"]["type"] == "Case", got)

# 3. Upsert on the external id: 201 created, then 200 (v46+) or 204 updated.
status = sf.Case.upsert("Edge_Event_Id__c/py-event-1", {"Subject": "upserted", "Priority": "Low"})
check("first upsert creates (201)", status == 201, status)
status = sf.Case.upsert("Edge_Event_Id__c/py-event-1", {"Priority": "High"})
check("second upsert updates (200/204)", status in (200, 204), status)
by_ext = sf.Case.get_by_custom_id("Edge_Event_Id__c", "py-event-1")
check("upsert updated, not duplicated", by_ext["Priority"] == "High" and by_ext["Subject"] == "upserted", by_ext)

# 4. SOQL query, and query_all through nextRecordsUrl paging.
res = sf.query("SELECT Id, Subject, Priority FROM Case WHERE Edge_Event_Id__c = 'py-event-1'")
check("query finds one record", res["totalSize"] == 1 and res["done"] is True, res)
check("query returns the selected fields", res["records"][0]["Priority"] == "High", res)
for i in range(5):
    sf.Case.upsert(f"Edge_Event_Id__c/py-bulk-{i}", {"Subject": f"bulk {i}"})
requests.patch(f"{EMULATOR}/__emulator/settings", json={"query_batch_size": 2}).raise_for_status()
first = sf.query("SELECT Id FROM Case WHERE Subject LIKE 'bulk%'")
check("a big result is paged", first["done"] is False and "nextRecordsUrl" in first, first)
allrows = sf.query_all("SELECT Id, Subject FROM Case WHERE Subject LIKE 'bulk%' ORDER BY Subject")
check("query_all follows nextRecordsUrl", allrows["totalSize"] == 5 and len(allrows["records"]) == 5, allrows)
check("ORDER BY holds across pages", [r["Subject"] for r in allrows["records"]] == [f"bulk {i}" for i in range(5)], allrows)

# 5. Error shapes, as simple-salesforce maps them.
try:
    sf.Case.create({"Foo__c": "x"})
    check("unknown field is refused", False)
except SalesforceMalformedRequest as e:
    check("unknown field -> 400 INVALID_FIELD", e.status == 400 and e.content[0]["errorCode"] == "INVALID_FIELD", e.content)
requests.patch(f"{EMULATOR}/__emulator/settings", json={"required_case_fields": ["Subject"]}).raise_for_status()
try:
    sf.Case.create({"Origin": "Web"})
    check("missing required field is refused", False)
except SalesforceMalformedRequest as e:
    item = e.content[0]
    check("required -> REQUIRED_FIELD_MISSING with fields", item["errorCode"] == "REQUIRED_FIELD_MISSING" and item["fields"] == ["Subject"], e.content)
try:
    sf.Case.get("500000000000000AAA")
    check("missing record is 404", False)
except SalesforceResourceNotFound as e:
    check("missing record -> 404 NOT_FOUND", e.content[0]["errorCode"] == "NOT_FOUND", e.content)
try:
    sf.query("SELECT Id FROM")
    check("bad SOQL is refused", False)
except SalesforceMalformedRequest as e:
    check("bad SOQL -> MALFORMED_QUERY", e.content[0]["errorCode"] == "MALFORMED_QUERY", e.content)
usage = sf.api_usage.get("api-usage")
check("Sforce-Limit-Info is parsed", usage is not None and usage.used > 0, sf.api_usage)

# 6. Wrong password: 400 invalid_grant, raised as an authentication failure.
try:
    Salesforce(username=USER, password="wrongTOKEN", consumer_key="edgecase-client-id",
               consumer_secret="edgecase-client-secret", session=ToEmulator())
    check("wrong password is refused", False)
except SalesforceAuthenticationFailed as e:
    check("wrong password -> invalid_grant", "invalid_grant" in str(e), str(e))

# 7. JWT bearer grant, signed by the client with the private key (PyJWT, RS256).
jwt_sf = Salesforce(username=USER, consumer_key="edgecase-client-id", privatekey_file=KEY_FILE, session=ToEmulator())
res = jwt_sf.query("SELECT Id FROM Case WHERE Edge_Event_Id__c = 'py-event-1'")
check("JWT bearer session works", res["totalSize"] == 1, res)
try:
    Salesforce(username="nobody@example.com", consumer_key="edgecase-client-id", privatekey_file=KEY_FILE, session=ToEmulator())
    check("JWT for an unknown user is refused", False)
except SalesforceAuthenticationFailed as e:
    check("JWT unknown user -> invalid_grant", "invalid_grant" in str(e), str(e))

# 8. An ended session: the emulator answers 401 INVALID_SESSION_ID, and simple-salesforce
# (which keeps its login parameters) logs in again and repeats the call.
before = requests.get(f"{EMULATOR}/__emulator/stats").json()["token_requests"]
requests.post(f"{EMULATOR}/__emulator/expire-sessions").raise_for_status()
old_session = sf.session_id
res = sf.query("SELECT Id FROM Case WHERE Edge_Event_Id__c = 'py-event-1'")
after = requests.get(f"{EMULATOR}/__emulator/stats").json()["token_requests"]
check("after a 401 the client logged in again", after == before + 1 and sf.session_id != old_session, (before, after))
check("and its repeated call worked", res["totalSize"] == 1, res)
bare = Salesforce(instance_url=EMULATOR, session_id=old_session, session=ToEmulator())
try:
    bare.query("SELECT Id FROM Case")
    check("an ended session is refused", False)
except SalesforceExpiredSession as e:
    check("ended session -> 401 INVALID_SESSION_ID", e.content[0]["errorCode"] == "INVALID_SESSION_ID", e.content)

print(f"simple-salesforce against the emulator: {len(CHECKS)} checks passed")
