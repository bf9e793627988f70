"""The scrape loop an agent runs against /metrics, written once for the kernel tests and
the benchmarks: a Python script (stdlib only, so any python3 runs it, as any user) to pass
with `python3 -c SCRAPER URL THREADS [SECONDS]`.

THREADS threads fetch URL back to back; the script prints "scraping" once they run, and
stops after SECONDS or, without it, when its stdin closes; then it prints the scrapes
served and failed ("OK FAILED"). It only reads URL (loopback in every use).
"""

from __future__ import annotations

SCRAPER = """
import sys, threading, time, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
seconds = float(sys.argv[3]) if len(sys.argv) > 3 else None
done, ok, failed = threading.Event(), [0], [0]
def loop():
    while not done.is_set():
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                r.read()
            ok[0] += 1
        except OSError:
            failed[0] += 1
            time.sleep(0.01)
threads = [threading.Thread(target=loop, daemon=True) for _ in range(n)]
for t in threads:
    t.start()
print("scraping", flush=True)
if seconds is None:
    sys.stdin.read()
else:
    time.sleep(seconds)
done.set()
print(ok[0], failed[0], flush=True)
"""
