#!/usr/bin/python3
"""Drives Debian's headless Chromium through chromedriver (python3-selenium) against a running
appliance's web UI. Called by tests/tests/ui.rs with one JSON argument; exits non-zero with the
reason on the first expectation that does not hold, and saves screenshots on the way.

The plan (JSON): ui (https://…/), password, alice / bob / carol identities, alice_snapshot,
alice_older (a second snapshot of alice, for the diff), bob_snapshot, file (path inside alice's
snapshot), source (that file on disk), downloads (an empty directory), shots (where screenshots
go).
"""

import json
import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

PLAN = json.loads(sys.argv[1])
UI = PLAN["ui"].rstrip("/")


def fail(why):
    print(f"FAILED: {why}", file=sys.stderr)
    sys.exit(1)


def expect(cond, why):
    if not cond:
        fail(why)


def browser():
    o = webdriver.ChromeOptions()
    o.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1280,860", "--lang=en-US"):
        o.add_argument(a)
    # The appliance's certificate is self-signed (clients pin it by fingerprint).
    o.accept_insecure_certs = True
    o.add_experimental_option("prefs", {
        "download.default_directory": PLAN["downloads"],
        "download.prompt_for_download": False,
        "safebrowsing.enabled": False,
    })
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)


def arrived(d, cond):
    """Waits (up to 20 s) for the navigation a click started to reach a page where cond holds."""
    try:
        WebDriverWait(d, 20).until(cond)
    except Exception:  # noqa: BLE001 (a timeout, or a page torn down mid-check)
        fail(f"the expected page did not come: at {d.current_url}")


def shot(d, name):
    d.save_screenshot(os.path.join(PLAN["shots"], name + ".png"))


def body(d):
    return d.find_element(By.TAG_NAME, "body").text


def login(d, identity):
    d.delete_all_cookies()
    d.get(UI + "/login")
    d.find_element(By.NAME, "identity").send_keys(identity)
    d.find_element(By.NAME, "password").send_keys(PLAN["password"])
    if identity == PLAN["alice"]:
        shot(d, "login")
    d.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
    # The next page, once the browser has navigated to it.
    arrived(d, lambda d: d.find_elements(By.CSS_SELECTOR, "form.logout"))
    expect(identity in body(d), f"{identity} is not shown as logged in: {body(d)[:300]}")


def logout(d):
    d.find_element(By.CSS_SELECTOR, "form.logout button").click()
    arrived(d, lambda d: d.current_url.endswith("/login"))


def wait_for_download(name, size):
    """The downloaded file once Chromium finished writing it (no .crdownload left)."""
    path = os.path.join(PLAN["downloads"], name)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        names = os.listdir(PLAN["downloads"])
        if name in names and not any(n.endswith(".crdownload") for n in names):
            if os.path.getsize(path) == size:
                return path
        time.sleep(0.1)
    fail(f"the download of {name} did not complete: {os.listdir(PLAN['downloads'])}")


def alice(d):
    login(d, PLAN["alice"])
    page = body(d)
    expect(PLAN["bob"] not in page, "alice's list shows bob's snapshot")
    links = d.find_elements(By.CSS_SELECTOR, f"a[href='/snapshots/{PLAN['alice_snapshot']}']")
    expect(links, "alice's snapshot is not listed")
    shot(d, "snapshots")
    links[0].click()
    arrived(d, lambda d: "/snapshots/" in d.current_url)
    # Browse down to the file, one directory at a time, as a person would.
    parts = PLAN["file"].split("/")
    for p in parts[:-1]:
        d.find_element(By.LINK_TEXT, p + "/").click()
        arrived(d, lambda d, p=p: d.current_url.endswith(p))
    shot(d, "browse")
    d.find_element(By.LINK_TEXT, parts[-1]).click()
    want = open(PLAN["source"], "rb").read()
    got = open(wait_for_download(parts[-1], len(want)), "rb").read()
    expect(got == want, f"the downloaded {parts[-1]} differs from the source")
    # The diff of alice's two snapshots names the file that changed.
    d.get(f"{UI}/diff?a={PLAN['alice_older']}&b={PLAN['alice_snapshot']}")
    expect(PLAN["changed"] in body(d), f"the diff does not name {PLAN['changed']}: {body(d)[:400]}")
    shot(d, "diff")
    # Typing the URL of bob's snapshot shows nothing of it.
    d.get(f"{UI}/snapshots/{PLAN['bob_snapshot']}")
    page = body(d)
    expect("no snapshot" in page and PLAN["bob_file"] not in page,
           f"alice reached bob's snapshot: {page[:300]}")
    d.get(f"{UI}/snapshots/{PLAN['bob_snapshot']}/file?path={PLAN['bob_file']}")
    expect("no snapshot" in body(d), "alice downloaded from bob's snapshot")
    d.get(UI + "/")
    logout(d)
    # The logged-out cookie is gone and the session with it: pages ask for a login again.
    d.get(f"{UI}/snapshots/{PLAN['alice_snapshot']}")
    expect(d.current_url.endswith("/login"), f"a logged-out browser still sees {d.current_url}")


def bob(d):
    login(d, PLAN["bob"])
    expect(PLAN["alice_snapshot"] not in d.page_source, "bob's list links alice's snapshot")
    expect(PLAN["alice"] not in body(d).replace(PLAN["bob"], ""), "bob's list names alice")
    d.get(f"{UI}/snapshots/{PLAN['alice_snapshot']}")
    page = body(d)
    expect("no snapshot" in page and PLAN["file"].split("/")[0] not in page,
           f"bob reached alice's snapshot: {page[:300]}")
    d.get(UI + "/operator")
    expect("FULL access on the acl target" in body(d), "bob sees the operator pages")
    d.get(UI + "/")
    logout(d)


def carol(d):
    login(d, PLAN["carol"])
    d.get(UI + "/operator")
    rows = d.find_elements(By.CSS_SELECTOR, "#freshness tbody tr")
    state = {}
    for r in rows:
        cells = [c.text for c in r.find_elements(By.TAG_NAME, "td")]
        state[cells[0]] = cells[-1]
    expect(state.get(PLAN["alice"]) == "late", f"alice is not marked late: {state}")
    expect(state.get(PLAN["bob"]) == "no schedule", f"bob's row: {state}")
    shot(d, "operator")
    d.get(UI + "/operator/audit")
    expect("user.add" in body(d), "the audit page does not list account creation")
    shot(d, "audit")


def main():
    d = browser()
    try:
        alice(d)
        bob(d)
        carol(d)
    finally:
        d.quit()
    print("browser test passed")


main()
