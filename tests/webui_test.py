"""The chat page of `llama serve` in headless Chromium, driven by Selenium.

Run by tests/it/serve_cli.rs:  python tests/webui_test.py BASE_URL API_KEY SCREENSHOT.png
Each check prints one line; any failure raises (non-zero exit).
"""
import json
import sys
import tempfile
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

base, key, shot = sys.argv[1], sys.argv[2], sys.argv[3]
QUESTION = "What is the capital of France?"


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok {name}")


def api(path, body=None):
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer " + key})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read().decode()


def busy():
    # Summed over the `model` label.
    total = 0.0
    for line in api("/metrics").splitlines():
        if line.startswith("llama_busy_sequences ") or line.startswith("llama_busy_sequences{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait(cond, what, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--window-size=1200,900",
             "--user-data-dir=" + tempfile.mkdtemp()]:
    opts.add_argument(flag)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    d = driver
    d.get(base + "/")
    check("page", d.title == "llama.rs", d.title)

    def field(id, value):
        el = d.find_element(By.ID, id)
        el.clear()
        el.send_keys(value)

    def answers():
        return d.find_elements(By.CSS_SELECTOR, ".msg[data-role=assistant]")

    def ask(text):
        n = len(d.find_elements(By.CSS_SELECTOR, ".msg"))
        box = d.find_element(By.ID, "input")
        box.send_keys(text)
        box.send_keys(Keys.ENTER)
        wait(lambda: len(d.find_elements(By.CSS_SELECTOR, ".msg")) >= n + 2, "the answer's bubble")
        return d.find_elements(By.CSS_SELECTOR, ".msg")[-1]

    # Without the key: the page says it needs one.
    bubble = ask(QUESTION)
    wait(lambda: bubble.get_attribute("data-state") == "done", "the refusal")
    check("needs the key", "API key" in bubble.text and "error" in bubble.get_attribute("class"), bubble.text)

    # With the key, greedy: the streamed answer equals the server's own answer.
    d.find_element(By.ID, "new-chat").click()
    field("api_key", key)
    field("temperature", "0")
    field("max_tokens", "24")
    bubble = ask(QUESTION)
    wait(lambda: bubble.get_attribute("data-state") == "done", "the answer")
    want = json.loads(api("/v1/chat/completions", {
        "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "top_p": 0.95, "max_tokens": 24,
    }))["choices"][0]["message"]["content"]
    check("streamed answer", bubble.text.strip() == want.strip(), (bubble.text, want))
    stats = d.find_element(By.ID, "stats").text
    check("speed shown", "tok/s" in stats and "first token" in stats, stats)

    # Stop during a long answer: generation ends on the server.
    field("temperature", "0.8")
    field("max_tokens", "1000")
    bubble = ask("Write a very long story about a dragon who learns to bake bread.")
    wait(lambda: len(bubble.text) > 20, "the story to start")
    check("generating", busy() >= 1, busy())
    d.find_element(By.ID, "stop").click()
    wait(lambda: bubble.get_attribute("data-state") == "done", "the stop")
    start = time.time()
    wait(lambda: busy() == 0, "no busy sequence", timeout=5)
    check("stopped on the server", time.time() - start < 2)
    d.save_screenshot(shot)

    # Reload: the conversation is kept.
    d.refresh()
    wait(lambda: len(d.find_elements(By.CSS_SELECTOR, ".msg")) >= 4, "the kept conversation", timeout=10)
    first = d.find_elements(By.CSS_SELECTOR, ".msg[data-role=user]")[0]
    check("kept", first.text == QUESTION and len(answers()) == 2, first.text)

    # An answer with HTML in it is shown as text and runs nothing.
    hostile = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"><b>bold</b>'
    d.execute_script("""
        const s = JSON.parse(localStorage.getItem('llama-rs-conversations'));
        s.conversations.push({title: 'html', messages: [{role: 'user', content: 'hi'},
                                                        {role: 'assistant', content: arguments[0]},
                                                        {role: 'user', content: 'code?'},
                                                        {role: 'assistant', content: arguments[1]}]});
        s.current = s.conversations.length - 1;
        localStorage.setItem('llama-rs-conversations', JSON.stringify(s));
    """, hostile, "Here:\n```rust\nfn main() {}\n```\nDone.")
    d.refresh()
    wait(lambda: len(answers()) == 2, "the hostile conversation", timeout=10)
    shown = answers()[0]
    check("html as text", shown.text == hostile, shown.text)
    check("no elements", not shown.find_elements(By.CSS_SELECTOR, "script, img, b"))
    time.sleep(0.3)
    check("nothing ran", d.execute_script("return window.__xss === undefined"))
    code = answers()[1].find_elements(By.CSS_SELECTOR, "pre code")
    check("code block", len(code) == 1 and code[0].text == "fn main() {}", [c.text for c in code])
    print("all ok")
finally:
    driver.quit()
