//! The debug console in a real browser: Debian's Chromium, headless, driven through
//! chromedriver (WebDriver) with fantoccini. Everything stays on loopback: the server, the
//! agent, chromedriver, and a browser told to resolve no other name and fetch nothing in the
//! background.
//!
//! It logs in, opens the tree, finds a VM, watches its queue fill while a slow stop runs (the
//! simulated hypervisor takes 2 s a command), watches a restart appear after a panic injected
//! in an operation (the `vm-start-after-define` failpoint, present in the workspace's test
//! build), changes a queue's level through the page (confirming its dialog), and keeps a
//! screenshot in `target/console-screenshot.png`.
//!
//! Ignored in a plain `cargo nextest run`: it needs `chromium` and `chromium-driver`, which
//! `scripts/test` installs (and runs the ignored tests).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

async fn browser(chromedriver: std::net::SocketAddr) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({ "binary": "/usr/bin/chromium", "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--window-size=1400,1000", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-default-apps",
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        ] }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(&format!("http://{chromedriver}"))
        .await
        .expect("a chromium session")
}

/// Clicks what `css` finds, in the page's own script: the live view redraws its tables every
/// second, so an element found a moment before may be gone by the time a WebDriver click
/// reaches it.
async fn click(client: &Client, css: &str) {
    let started = Instant::now();
    // Clicked after the script returns: a click that opens a dialog would block the script.
    let script = "const e = document.querySelector(arguments[0]); if (e) { setTimeout(() => e.click(), 0); return true; } return false;";
    while client.execute(script, vec![json!(css)]).await.unwrap() != json!(true) {
        assert!(started.elapsed() < Duration::from_secs(30), "nothing to click at {css}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `check` finds what it looks for in the page's text.
async fn wait_for_text(client: &Client, what: &str, check: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        let text = client.find(Locator::Css("body")).await.unwrap().text().await.unwrap();
        if check(&text) {
            return text;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never saw {what} in:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and chromium-driver (scripts/test installs them)"]
async fn the_console_in_a_real_browser() {
    let cluster = tokio::task::spawn_blocking(|| {
        TestCluster::start(
            ClusterOpts::sim(2000).env("STRATO_FAILPOINTS", "vm-start-after-define=1*panic"),
        )
    })
    .await
    .unwrap();
    let (api, agent) = (cluster.api, cluster.agent);
    let setup = tokio::task::spawn_blocking(move || {
        let Infrastructure { offering, l3, .. } =
            vm_infrastructure(api, agent, "10.0.0.10", "10.0.0.20");
        let vm = create(
            api,
            "/v1/vm-instances",
            json!({ "name": "watched", "instanceOfferingUuid": offering["uuid"], "l3NetworkUuids": [l3["uuid"]] }),
        );
        vm["uuid"].as_str().unwrap().to_owned()
    });
    let vm = setup.await.unwrap();

    let chromedriver = free_port();
    let mut driver = Proc {
        child: Command::new("chromedriver")
            .arg(format!("--port={}", chromedriver.port()))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (scripts/test installs chromium-driver)"),
    };
    let started = Instant::now();
    while std::net::TcpStream::connect(chromedriver).is_err() {
        assert!(started.elapsed() < Duration::from_secs(20), "chromedriver did not listen");
        assert!(driver.child.try_wait().unwrap().is_none(), "chromedriver exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = browser(chromedriver).await;

    // Log in.
    client.goto(&format!("http://{api}/console")).await.unwrap();
    client.wait().for_element(Locator::Id("password")).await.unwrap();
    client.find(Locator::Id("password")).await.unwrap().send_keys(ADMIN_PASSWORD).await.unwrap();
    client.find(Locator::Id("login-button")).await.unwrap().click().await.unwrap();

    // The tree, then the VM found by name.
    wait_for_text(&client, "the supervision tree", |t| t.contains("vm-supervisor")).await;
    client.find(Locator::Id("filter")).await.unwrap().send_keys("watch").await.unwrap();
    client.find(Locator::Id("search")).await.unwrap().click().await.unwrap();
    click(&client, &format!("tr[data-uuid='{vm}'] a")).await;
    wait_for_text(&client, "the VM's page", |t| t.contains(&format!("vm {vm}"))).await;

    // A slow stop holds the lifecycle queue; a destroy queues behind it: the page shows both.
    let stop_vm = vm.clone();
    tokio::task::spawn_blocking(move || {
        let (status, _, _) = http(
            api,
            "PUT",
            &format!("/v1/vm-instances/{stop_vm}/actions"),
            Some(r#"{"stopVmInstance": {}}"#),
            &[],
        );
        assert_eq!(status, 202);
    })
    .await
    .unwrap();
    wait_for_text(&client, "the stop holding the queue", |t| t.contains("stop (")).await;
    let destroy_vm = vm.clone();
    tokio::task::spawn_blocking(move || {
        assert_eq!(
            http(api, "DELETE", &format!("/v1/vm-instances/{destroy_vm}"), None, &[]).0,
            202
        );
    })
    .await
    .unwrap();
    wait_for_text(&client, "the destroy waiting", |t| t.contains("destroy (")).await;

    // Recover, then start: the start panics after defining the domain (the failpoint); the
    // actor restarts, and the page shows the restart with its error.
    let start_vm = vm.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        loop {
            let (status, _, body) =
                http(api, "GET", &format!("/v1/vm-instances/{start_vm}"), None, &[]);
            assert_eq!(status, 200);
            if body["inventories"][0]["state"] == "Destroyed" {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "{body}");
            std::thread::sleep(Duration::from_millis(100));
        }
        call(
            api,
            "PUT",
            &format!("/v1/vm-instances/{start_vm}/actions"),
            Some(r#"{"recoverVmInstance": {}}"#),
        );
        call(
            api,
            "PUT",
            &format!("/v1/vm-instances/{start_vm}/actions"),
            Some(r#"{"startVmInstance": {}}"#),
        );
    })
    .await
    .unwrap();
    wait_for_text(&client, "the restart after the panic", |t| t.contains("vm-start-after-define"))
        .await;

    // A VM's lifecycle queue is serial: the page says so and offers no level to set.
    wait_for_text(&client, "the serial lifecycle queue", |t| t.contains("serial")).await;
    assert!(
        client.find(Locator::Css("button.set-level[data-queue='lifecycle']")).await.is_err(),
        "a serial queue offered a level"
    );

    // A host's command queue is not: its level for every host, in a prompt, then confirmed.
    client.find(Locator::Id("filter")).await.unwrap().clear().await.unwrap();
    client.find(Locator::Id("search")).await.unwrap().click().await.unwrap();
    click(&client, "#kinds a.link[data-kind='host']").await;
    click(&client, &format!("#actors tr[data-uuid]:not([data-uuid='{vm}']) a")).await;
    click(&client, "button.set-level[data-queue='command']").await;
    let started = Instant::now();
    while client.get_alert_text().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "no prompt for the level");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.send_alert_text("8").await.unwrap();
    client.accept_alert().await.unwrap();
    // Then the confirmation.
    let started = Instant::now();
    while client.get_alert_text().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "no confirmation asked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(client.get_alert_text().await.unwrap().contains("to 8?"));
    client.accept_alert().await.unwrap();
    wait_for_text(&client, "the new level in the tree", |t| t.contains("command 0/0 (8)")).await;
    let (_, _, tree) =
        tokio::task::spawn_blocking(move || http(api, "GET", "/debug/tree", None, &[]))
            .await
            .unwrap();
    let hosts =
        tree["kinds"].as_array().unwrap().iter().find(|k| k["kind"] == "host").unwrap().clone();
    assert!(
        hosts["queues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["name"] == "command" && q["level"] == 8),
        "{hosts}"
    );

    // The screenshot, kept as an artifact.
    let png = client.screenshot().await.unwrap();
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshot.png");
    std::fs::write(&path, &png).unwrap();
    assert!(png.len() > 10_000, "a screenshot of a page, not a blank one");
    client.close().await.unwrap();
}
