//! `loom serve` and Loom Studio as people meet them: the real binary over a store, and the page
//! driven in a real headless Chromium (WebDriver): the actor list, an actor's journal, the
//! state at an earlier seq chosen with the slider (checked against the state rebuilt from the
//! store), and a dead letter requeued: refused without the token, done with it; and Studio
//! served by a running application, with its live counters. A screenshot of each page is saved
//! under `target/studio-screenshots/`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, free_port, loom, seeded, serve, stop};
use fantoccini::{Client, ClientBuilder, Locator};
use loom_core::runtime::state_at;
use loom_core::{ActorId, EmbeddedStore, JournalStore};
use serde_json::{Value, json};

#[test]
fn serve_reads_any_store_and_writes_only_when_allowed_with_a_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    seeded(dir.path());
    let store = dir.path().to_str().expect("utf-8 path");
    let (ok, _, err) = loom(&["serve", "--store", store, "--allow-writes"]);
    assert!(!ok && err.contains("LOOM_TOKEN"), "{err}");

    let (server, base) = serve(store, &[], None);
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(async {
        let http = reqwest::Client::new();
        let get = |path: &str| {
            let r = http.get(format!("{base}{path}"));
            async move {
                let resp = r.send().await.expect("request");
                (resp.status().as_u16(), resp.text().await.expect("body"))
            }
        };
        let (s, page) = get("/").await;
        assert_eq!(s, 200);
        assert!(page.contains("<title>Loom Studio</title>"), "{page}");
        let (s, body) = get("/api/actors").await;
        assert_eq!(s, 200, "{body}");
        let actors: Value = serde_json::from_str(&body).expect("json");
        let ids: Vec<&str> = actors["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|a| a["actor"].as_str().expect("id"))
            .collect();
        assert_eq!(ids, ["counter/a", "counter/b", "counter/c"]);
        let (s, body) = get("/api/actors/counter/a/state").await;
        assert_eq!(s, 200, "{body}");
        let (s, body) = get("/api/deadletters").await;
        assert_eq!(s, 200, "{body}");
        let dead: Value = serde_json::from_str(&body).expect("json");
        let id = dead["items"][0]["id"].as_u64().expect("a dead letter");
        let resp = http
            .post(format!("{base}/api/deadletters/{id}/requeue"))
            .bearer_auth("anything")
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status().as_u16(), 403, "a read-only serve wrote");
        // Under a name that is not its own (a page's DNS rebinding), it answers nothing.
        let port = base.rsplit(':').next().expect("port");
        let resp = http
            .get(format!("{base}/api/actors"))
            .header("host", format!("rebound.example:{port}"))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status().as_u16(), 403);
        assert_eq!(resp.headers()["x-frame-options"], "DENY");
    });
    stop(server);
}

/// A connection to `base` (`http://host:port`) that gives up a read after `wait`.
fn connect(base: &str, wait: Duration) -> std::net::TcpStream {
    let addr = base.strip_prefix("http://").expect("an http:// address");
    let c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(wait)).expect("read timeout");
    c
}

/// Reads from `c` until the server closes it; `None` when nothing came within its read
/// timeout. Returns what was read.
fn read_to_close(c: &mut std::net::TcpStream) -> Option<String> {
    use std::io::Read;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            // Reset by the server: closed as well.
            Err(_) => return Some(String::from_utf8_lossy(&got).into_owned()),
        }
    }
}

#[test]
fn serve_closes_slow_headers_and_caps_its_connections() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("temp dir");
    seeded(dir.path());
    let store = dir.path().to_str().expect("utf-8 path");
    let (server, base) = serve(
        store,
        &["--header-timeout-ms", "500", "--max-connections", "2"],
        None,
    );
    let get = format!(
        "GET /api/actors HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        base.trim_start_matches("http://")
    );
    // Half a request's headers, then nothing (slowloris): closed after the timeout.
    let began = Instant::now();
    let mut slow = connect(&base, Duration::from_secs(20));
    slow.write_all(b"GET /api/actors HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .expect("write");
    assert!(
        read_to_close(&mut slow).is_some(),
        "a trickled request held its connection 20 s"
    );
    assert!(
        began.elapsed() >= Duration::from_millis(400),
        "{:?}",
        began.elapsed()
    );
    // Two silent connections take both slots: a third's whole request waits, unanswered,
    // until their header time is up and they are closed.
    let began = Instant::now();
    let mut silent: Vec<_> = (0..2)
        .map(|_| connect(&base, Duration::from_secs(20)))
        .collect();
    // Both accepted before the third connects (the server takes them in order).
    std::thread::sleep(Duration::from_millis(100));
    let mut third = connect(&base, Duration::from_secs(20));
    third.write_all(get.as_bytes()).expect("write");
    let answer = read_to_close(&mut third).expect("the third connection answered");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        began.elapsed() >= Duration::from_millis(400),
        "the third was served at once, past the cap: {:?}",
        began.elapsed()
    );
    for c in &mut silent {
        assert!(read_to_close(c).is_some(), "a silent connection was kept");
    }
    stop(server);
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/studio-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(screenshots().join(name), png).expect("write screenshot");
}

/// Waits until `script` (a JS expression) is truthy in the page; its value.
async fn until(c: &Client, what: &str, script: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = c
            .execute(&format!("return ({script}) || null;"), vec![])
            .await
            .expect("execute");
        if !v.is_null() && v != json!(false) {
            return v;
        }
        assert!(Instant::now() < deadline, "waited 20 s for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// chromedriver on a free port (stopped when dropped), and that port.
fn chromedriver() -> (Proc, u16) {
    let Some(path) = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        panic!(
            "chromedriver is missing: apt-get install -y chromium chromium-driver (./scripts/test does)"
        );
    };
    let port = free_port();
    let proc = Proc(
        Command::new(path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver"),
    );
    (proc, port)
}

/// A headless Chromium session through `driver`.
async fn browser(driver: &(Proc, u16)) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({ "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"] }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match ClientBuilder::new(connector.clone())
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{}", driver.1))
            .await
        {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for chromedriver: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("chromedriver did not answer: {e}"),
        }
    }
}

#[test]
fn studio_in_a_browser_travels_in_time_and_requeues_with_the_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    seeded(dir.path());
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    // The states the page must show, rebuilt from the store before `loom serve` locks it.
    let a = ActorId::new("counter", "a").expect("id");
    let (highest, early, at_highest, at_early) = rt.block_on(async {
        let store = EmbeddedStore::open(dir.path()).expect("open");
        let info = store.info(&a).await.expect("info");
        let early = info.snapshots[0] + 1;
        assert!(early < info.highest, "{info:?}");
        let h = state_at(&store, &a, info.highest)
            .await
            .expect("state")
            .state;
        let e = state_at(&store, &a, early).await.expect("state").state;
        assert_ne!(h, e, "the two seqs must show different states");
        // Not only as state_at says: the counter was sent 1 thirty times.
        assert_eq!(h, json!(30));
        assert!(e.as_u64().is_some_and(|n| n > 0 && n < 30), "{e}");
        (info.highest, early, h, e)
    });
    let store = dir.path().to_str().expect("utf-8 path");
    let (server, base) = serve(store, &["--allow-writes"], Some("s3cret"));
    let driver = chromedriver();
    rt.block_on(async {
        let c = browser(&driver).await;

        // The actor list, and into one actor.
        c.goto(&format!("{base}/#/")).await.expect("open Studio");
        until(&c, "the actor list", "document.querySelectorAll('#actors a.actor-link').length === 3").await;
        // `loom serve`'s /metrics has no per-kind gauge here (nothing parked): after the first
        // poll, still no live strip.
        until(&c, "the first poll of /metrics", "document.getElementById('live').dataset.polled === '1'").await;
        assert_eq!(
            c.execute("return document.getElementById('live').hidden;", vec![]).await.expect("read"),
            json!(true),
            "live counters under loom serve"
        );
        shot(&c, "actors.png").await;
        // A search by the start of an id: one actor, then back to all of them.
        c.execute("document.getElementById('search').value = 'counter/b';", vec![]).await.expect("type");
        c.execute("document.getElementById('search-form').requestSubmit();", vec![]).await.expect("submit");
        until(&c, "the search's one match", "document.querySelectorAll('#actors a.actor-link').length === 1 && document.querySelector('#actors a.actor-link').textContent === 'counter/b'").await;
        shot(&c, "search.png").await;
        c.execute("document.getElementById('search').value = 'counter';", vec![]).await.expect("type");
        c.execute("document.getElementById('search-form').requestSubmit();", vec![]).await.expect("submit");
        until(&c, "a whole kind", "document.querySelectorAll('#actors a.actor-link').length === 3").await;
        c.find(Locator::LinkText("counter/a")).await.expect("the link").click().await.expect("click");
        until(&c, "the state at the newest seq", "document.querySelector('#state[data-ready]')").await;
        let shown = |c: &Client| {
            let c = c.clone();
            async move {
                let text = c.find(Locator::Id("state")).await.expect("#state").text().await.expect("text");
                serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("#state is not JSON ({e}): {text}"))
            }
        };
        assert_eq!(shown(&c).await, at_highest);
        let seq_label = c.find(Locator::Id("seq-label")).await.expect("label").text().await.expect("text");
        assert_eq!(seq_label, highest.to_string());

        // Time travel: the slider to an earlier seq shows the state the store had then.
        c.execute(
            "const s = document.getElementById('seq'); s.value = arguments[0]; s.dispatchEvent(new Event('input'));",
            vec![json!(early)],
        )
        .await
        .expect("move the slider");
        until(&c, "the state at the earlier seq", &format!("document.getElementById('state').dataset.seq === '{early}'")).await;
        assert_eq!(shown(&c).await, at_early);
        // The timeline holds summaries; the picked entry is fetched whole.
        until(&c, "the picked entry", &format!("document.getElementById('entry').dataset.seq === '{early}'")).await;
        let entry = c.find(Locator::Id("entry")).await.expect("#entry").text().await.expect("text");
        let entry: Value = serde_json::from_str(&entry).expect("the entry as JSON");
        assert_eq!(entry["seq"], json!(early), "the picked entry is shown");
        shot(&c, "actor.png").await;

        // A dead letter: refused without the token, requeued with it.
        c.goto(&format!("{base}/#/deadletters")).await.expect("dead letters");
        until(&c, "the dead letter", "document.querySelectorAll('tr.deadletter').length === 1").await;
        c.find(Locator::Css("button.requeue")).await.expect("button").click().await.expect("click");
        until(&c, "the refusal", "document.getElementById('message').className === 'bad'").await;
        let refusal = c.find(Locator::Id("message")).await.expect("message").text().await.expect("text");
        assert!(refusal.contains("bearer token"), "{refusal}");
        assert_eq!(
            c.execute("return document.querySelectorAll('tr.deadletter').length;", vec![]).await.expect("count"),
            json!(1),
            "the dead letter went without the token"
        );
        shot(&c, "deadletters-refused.png").await;
        c.find(Locator::Id("token")).await.expect("token").send_keys("s3cret").await.expect("type");
        // A purge, with the token, is asked about first: turned down, nothing goes (before:
        // one click deleted the message for good).
        c.find(Locator::Css("button.purge")).await.expect("button").click().await.expect("click");
        let asked = c.get_alert_text().await.expect("a purge asks first");
        assert!(asked.contains("deleted for good"), "{asked}");
        c.dismiss_alert().await.expect("turn it down");
        assert_eq!(
            c.execute("return document.querySelectorAll('tr.deadletter').length;", vec![]).await.expect("count"),
            json!(1),
            "the purge went ahead though it was turned down"
        );
        c.find(Locator::Css("button.requeue")).await.expect("button").click().await.expect("click");
        until(&c, "the list emptied", "document.getElementById('no-deadletters')").await;
        let done = c.find(Locator::Id("message")).await.expect("message").text().await.expect("text");
        assert!(done.contains("requeued"), "{done}");
        shot(&c, "deadletters-requeued.png").await;
        c.close().await.expect("close the browser");
    });
    drop(driver);
    stop(server);
}

/// Parked actors are shown a page of 100 at a time, with a way on to the next (*before*: the
/// first 100, and no way to the others).
#[test]
fn studio_pages_parked_actors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(async {
        let store = EmbeddedStore::open(dir.path()).expect("open");
        for n in 0..101 {
            let id = ActorId::new("stuck", format!("s{n:03}")).expect("id");
            let park = loom_core::Park::new("node-a", "a bug");
            loom_core::Parking::park(&store, &id, &park, None)
                .await
                .expect("park");
        }
    });
    let store = dir.path().to_str().expect("utf-8 path");
    let (server, base) = serve(store, &[], None);
    let driver = chromedriver();
    rt.block_on(async {
        let c = browser(&driver).await;
        c.goto(&format!("{base}/#/parked")).await.expect("parked");
        until(&c, "the first page of parked actors", "document.querySelectorAll('#parked tr.parked').length === 100").await;
        c.find(Locator::Id("parked-next")).await.expect("the next page").click().await.expect("click");
        until(&c, "the second page of parked actors", "document.querySelectorAll('#parked tr.parked').length === 1 && document.querySelector('#parked tr.parked a').textContent === 'stuck/s100'").await;
        shot(&c, "parked-next-page.png").await;
        c.close().await.expect("close the browser");
    });
    drop(driver);
    stop(server);
}

/// A running application serves Studio itself (its store is locked by it, so `loom serve`
/// cannot open it): the bank example with `--listen`, after its own run, shows its actors and,
/// live from its `/metrics`, what each kind did and what waits.
#[test]
fn a_running_app_serves_studio_with_live_counters() {
    let bank = loom_testkit::examples::example("bank");
    let data = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(bank)
        .args([
            "--accounts",
            "4",
            "--transfers",
            "20",
            "--listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(data.path().join("bank"))
        .env_remove("LOOM_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the bank");
    let stdout = child.stdout.take().expect("stdout");
    let bank = Proc(child);
    let mut base = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read the bank's stdout");
        if let Some(b) = line.strip_prefix("listening on ") {
            base = Some(b.to_owned());
        }
        if line == "serving until Ctrl-C" {
            break;
        }
    }
    let base = base.expect("the bank said where it listens");
    let driver = chromedriver();
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(async {
        let c = browser(&driver).await;
        c.goto(&format!("{base}/#/")).await.expect("open Studio");
        until(&c, "the bank's actors", "document.querySelectorAll('#actors a.actor-link').length > 0").await;
        until(&c, "the live counters", "document.querySelector('tr.live-kind[data-kind=transfer]')").await;
        let row = |kind: &'static str| {
            let c = c.clone();
            async move {
                c.execute(
                    "return [...document.querySelector(`tr.live-kind[data-kind=${arguments[0]}]`).cells].map(td => td.textContent);",
                    vec![json!(kind)],
                )
                .await
                .expect("read the row")
            }
        };
        // kind, invocations, waiting mailboxes, ready now, longest wait, parked, retries, dead letters
        let transfer = row("transfer").await;
        let n = |v: &Value, i: usize| v[i].as_str().and_then(|s| s.parse::<f64>().ok()).unwrap_or_else(|| panic!("column {i} of {v}"));
        assert!(n(&transfer, 1) >= 60.0, "20 transfers are started, debited and credited: {transfer}");
        assert!(n(&transfer, 2) >= 20.0, "each settled transfer waits for its retirement: {transfer}");
        assert_eq!(n(&transfer, 3), 0.0, "{transfer}");
        let account = row("account").await;
        assert!(n(&account, 1) >= 40.0, "{account}");
        shot(&c, "live.png").await;
        // It goes on: a transfer started now shows in the next poll.
        let http = reqwest::Client::new();
        for (path, body) in [
            ("account/live-a", json!({"Open": 10})),
            ("account/live-b", json!({"Open": 0})),
            ("transfer/live-1", json!({"Start": {"from": "live-a", "to": "live-b", "amount": 1}})),
        ] {
            let resp = http.post(format!("{base}/actors/{path}/ask")).json(&body).send().await.expect("request");
            assert_eq!(resp.status().as_u16(), 200, "{path}");
        }
        let before = n(&transfer, 1);
        until(
            &c,
            "the next poll",
            &format!("Number(document.querySelector('tr.live-kind[data-kind=transfer]').cells[1].textContent) > {before}"),
        )
        .await;
        // Without LOOM_TOKEN the bank's admin API only reads.
        let resp = http.post(format!("{base}/api/parked/account/a0/unpark")).send().await.expect("request");
        assert_eq!(resp.status().as_u16(), 403, "a write without a token");
        // A page whose name is rebound to this address reaches neither the actors nor Studio.
        let port = base.rsplit(':').next().expect("port");
        let rebound = format!("rebound.example:{port}");
        let resp = http
            .post(format!("{base}/actors/account/live-c/ask"))
            .header("host", &rebound)
            .json(&json!({"Open": 5}))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status().as_u16(), 403, "an ask under a rebound name");
        for path in ["/api/actors", "/metrics", "/health"] {
            let resp = http.get(format!("{base}{path}")).header("host", &rebound).send().await.expect("request");
            assert_eq!(resp.status().as_u16(), 403, "{path} under a rebound name");
        }
        let resp = http.get(format!("{base}/metrics")).send().await.expect("request");
        assert_eq!(resp.status().as_u16(), 200, "/metrics under its own name");
        c.close().await.expect("close the browser");
    });
    drop(driver);
    stop(bank);
}
