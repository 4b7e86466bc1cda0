//! `bosun-cri` end to end, spoken to over its unix socket with the CRI v1
//! gRPC client — the wire protocol the kubelet and crictl use.
//!
//! The daemon runs inside a "node" network namespace (see `node/`); pods
//! get pinned namespaces of their own. The image is imported into the
//! daemon's store before it starts (pulls are covered by `registry.rs`).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::HashMap;
use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bosun_cri::server::streaming::spdy;
use bosun_testsupport::host;
use bosun_testsupport::privileged::require_root;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio_tungstenite::tungstenite;

mod bins;
mod node;

use node::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_lifecycle_over_grpc_survives_a_daemon_kill() -> Result<()> {
    if !require_root("bosun-cri end to end") {
        return Ok(());
    }
    let mut daemon = Daemon::new("10.231.0.0/24").await?;
    let mut rt = RuntimeServiceClient::new(daemon.channel().await?);
    let mut img = ImageServiceClient::new(daemon.channel().await?);

    let version = rt
        .version(cri::VersionRequest::default())
        .await?
        .into_inner();
    assert_eq!(version.runtime_name, "bosun");
    assert_eq!(version.runtime_api_version, "v1");
    let status = rt.status(cri::StatusRequest::default()).await?.into_inner();
    let conditions = status.status.context("no status")?.conditions;
    assert!(conditions.iter().all(|c| c.status), "{conditions:?}");
    let images = img
        .list_images(cri::ListImagesRequest::default())
        .await?
        .into_inner()
        .images;
    assert!(
        images
            .iter()
            .any(|i| i.repo_tags.iter().any(|t| t.ends_with("busybox:e2e"))),
        "{images:?}"
    );

    let logs = daemon.dir.path().join("pod-logs");
    let sandbox_config = pod_config("web", &logs);
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {}", daemon.log()))?
        .into_inner()
        .pod_sandbox_id;
    let pod_status = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("no pod status")?;
    let ip = pod_status.network.context("no network")?.ip;
    assert!(ip.starts_with("10.231.0."), "pod IP {ip}");
    assert_eq!(pod_status.state, cri::PodSandboxState::SandboxReady as i32);

    // As uid 1000 with extra groups: ExecSync must run as that too.
    let mut app = container_config("app", "echo hello from app; echo oops >&2; exec sleep 1000");
    if let Some(sc) = app.linux.as_mut().and_then(|l| l.security_context.as_mut()) {
        sc.run_as_user = Some(cri::Int64Value { value: 1000 });
        sc.supplemental_groups = vec![1234, 5678];
    }
    let created = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(app),
            sandbox_config: Some(sandbox_config.clone()),
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {}", daemon.log()))?
        .into_inner()
        .container_id;
    wait_state(&mut rt, &created, cri::ContainerState::ContainerCreated).await?;
    rt.start_container(cri::StartContainerRequest {
        container_id: created.clone(),
    })
    .await?;
    let running = wait_state(&mut rt, &created, cri::ContainerState::ContainerRunning).await?;
    assert!(running.image_ref.contains("sha256:"), "{running:?}");
    assert!(!running.image_id.is_empty());

    // Logs in the CRI format, at the path the kubelet asked for.
    let log_path = logs.join("app/0.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("oops") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(log.contains(" stdout F hello from app"), "{log}");
    assert!(log.contains(" stderr F oops"), "{log}");

    // ExecSync sees the pod's hostname, DNS and address.
    let exec = |cmd: &[&str]| cri::ExecSyncRequest {
        container_id: created.clone(),
        cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
        timeout: 10,
    };
    let out = rt.exec_sync(exec(&["hostname"])).await?.into_inner();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "web");
    let out = rt
        .exec_sync(exec(&["cat", "/etc/resolv.conf"]))
        .await?
        .into_inner();
    let resolv = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        resolv.contains("nameserver 10.96.0.10") && resolv.contains("ndots:5"),
        "{resolv}"
    );
    let out = rt
        .exec_sync(exec(&["ip", "-o", "addr", "show", "eth0"]))
        .await?
        .into_inner();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&ip));
    let out = rt
        .exec_sync(exec(&["sh", "-c", "exit 7"]))
        .await?
        .into_inner();
    assert_eq!(out.exit_code, 7);
    // The container's user and groups, not the runtime's default (root).
    let out = rt
        .exec_sync(exec(&["sh", "-c", "id -u; id -G"]))
        .await?
        .into_inner();
    let ids = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(ids.starts_with("1000\n"), "{ids}");
    assert!(ids.contains(" 1234") && ids.contains(" 5678"), "{ids}");
    // A timed-out command is killed, not left running in the container.
    let timed_out = rt
        .exec_sync(cri::ExecSyncRequest {
            timeout: 1,
            ..exec(&["sleep", "31"])
        })
        .await
        .expect_err("sleep 31 outlived a 1 s timeout");
    assert_eq!(timed_out.code(), tonic::Code::DeadlineExceeded);
    // Not even as a zombie: only the container's own `sleep 1000` is left.
    let out = rt
        .exec_sync(exec(&["ps", "-o", "comm"]))
        .await?
        .into_inner();
    let ps = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        ps.lines().filter(|l| l.trim() == "sleep").count(),
        1,
        "{ps}"
    );

    let listed = rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                label_selector: HashMap::from([("container".to_owned(), "app".to_owned())]),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .containers;
    assert_eq!(listed.len(), 1);
    let stats = rt
        .container_stats(cri::ContainerStatsRequest {
            container_id: created.clone(),
        })
        .await?
        .into_inner()
        .stats
        .context("no stats")?;
    assert!(stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .is_some_and(|w| w.value > 0));

    // A second container that exits by itself.
    let quick = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("quick", "exit 3")),
            sandbox_config: Some(sandbox_config.clone()),
        })
        .await?
        .into_inner()
        .container_id;

    // kill -9 the daemon: the container keeps running; the quick one
    // runs and exits while the daemon is down.
    daemon.kill9();
    let start_quick = Command::new(daemon.bins.join("bosun-runc"))
        .arg("--root")
        .arg(daemon.dir.path().join("state/runtime/bosun-runc"))
        .args(["start", &quick])
        .status()?;
    ensure!(start_quick.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.start()?;
    let mut rt = RuntimeServiceClient::new(daemon.channel().await?);
    let again = wait_state(&mut rt, &created, cri::ContainerState::ContainerRunning).await?;
    assert_eq!(again.started_at, running.started_at);
    let exited = wait_state(&mut rt, &quick, cri::ContainerState::ContainerExited).await?;
    assert_eq!(exited.exit_code, 3);
    assert_eq!(exited.reason, "Error");

    // Stop: sleep is PID 1 of its own namespace and ignores SIGTERM, so
    // SIGKILL follows after the timeout.
    rt.stop_container(cri::StopContainerRequest {
        container_id: created.clone(),
        timeout: 1,
    })
    .await?;
    let stopped = wait_state(&mut rt, &created, cri::ContainerState::ContainerExited).await?;
    assert_eq!(stopped.exit_code, 137, "{stopped:?}");
    for id in [&created, &quick] {
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: id.to_string(),
        })
        .await?;
    }
    // Unknown IDs: success, as the CRI asks.
    rt.stop_container(cri::StopContainerRequest {
        container_id: "nope".into(),
        timeout: 0,
    })
    .await?;
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: "nope".into(),
    })
    .await?;
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await?;
    let gone = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);

    // Nothing left: no mounts under our dirs (the namespace pin root stays
    // a shared mount point, as /run/netns does), no IPs, no bridge ports.
    let mounts = host::mounts()?;
    let pin_root = daemon.dir.path().join("state/ns");
    let left: Vec<_> = mounts
        .iter()
        .filter(|m| m.mount_point.starts_with(daemon.dir.path()) && m.mount_point != pin_root)
        .map(|m| m.mount_point.display().to_string())
        .collect();
    assert!(left.is_empty(), "mounts left: {left:?}");
    let ipam = daemon.dir.path().join("ipam/e2e");
    let ips = fs::read_dir(&ipam)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("10."))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(ips, 0);
    let ports = daemon
        .node
        .exec(&["ip", "-o", "link", "show", "master", "bcri0"])?;
    assert!(ports.trim().is_empty(), "{ports}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_can_pick_debians_runc_as_its_runtime_handler() -> Result<()> {
    if !require_root("bosun-cri end to end") {
        return Ok(());
    }
    let daemon = Daemon::new("10.232.0.0/24").await?;
    let mut rt = RuntimeServiceClient::new(daemon.channel().await?);
    let logs = daemon.dir.path().join("pod-logs");
    let sandbox_config = pod_config("legacy", &logs);
    let unknown = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: "kata".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
    assert!(unknown.message().contains("kata"));

    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: "runc".into(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("c", "echo via runc; exit 0")),
            sandbox_config: Some(sandbox_config),
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {}", daemon.log()))?
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await?;
    let done = wait_state(&mut rt, &id, cri::ContainerState::ContainerExited).await?;
    assert_eq!(done.exit_code, 0);
    assert_eq!(done.reason, "Completed");
    // runc itself knows the container: the CRI layer spoke plain OCI to it.
    let listed = Command::new("/usr/sbin/runc")
        .arg("--root")
        .arg(daemon.dir.path().join("state/runtime/runc"))
        .args(["list", "-q"])
        .output()?;
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&id));
    let log = fs::read_to_string(logs.join("c/0.log"))?;
    assert!(log.contains("stdout F via runc"), "{log}");
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await?;
    Ok(())
}

/// What one exec session sent back.
#[derive(Debug, Default)]
struct ExecOutput {
    stdout: String,
    stderr: String,
    status: String,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens an exec URL with `protocol`, from inside the node netns where
/// the daemon's loopback address lives.
async fn ws_connect(
    node: &NodeNs,
    url: &str,
    protocol: &str,
) -> Result<std::result::Result<Ws, tungstenite::Error>> {
    use tungstenite::client::IntoClientRequest;
    let addr = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .context("URL without host")?
        .to_owned();
    let stream = node_connect(node, addr)?;
    let mut request = url.replacen("http://", "ws://", 1).into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse()?);
    Ok(tokio_tungstenite::client_async(request, stream)
        .await
        .map(|(ws, _)| ws))
}

fn frame(channel: u8, data: &[u8]) -> tungstenite::Message {
    tungstenite::Message::binary([&[channel], data].concat())
}

/// Reads frames until the server closes the connection.
async fn ws_collect(ws: &mut Ws) -> Result<ExecOutput> {
    use futures_util::StreamExt;
    let mut out = ExecOutput::default();
    while let Some(message) = tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .context("exec output timed out")?
    {
        let tungstenite::Message::Binary(data) = message? else {
            continue;
        };
        let text = String::from_utf8_lossy(&data[1..]).into_owned();
        match data[0] {
            1 => out.stdout += &text,
            2 => out.stderr += &text,
            3 => out.status += &text,
            other => bail!("unexpected channel {other}"),
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_streams_over_websocket() -> Result<()> {
    use futures_util::SinkExt;
    if !require_root("bosun-cri end to end") {
        return Ok(());
    }
    let daemon = Daemon::new("10.233.0.0/24").await?;
    let mut rt = RuntimeServiceClient::new(daemon.channel().await?);
    let logs = daemon.dir.path().join("pod-logs");
    let sandbox_config = pod_config("shell", &logs);
    let pod = run_pod(&mut rt, &sandbox_config).await?;
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("sh", "exec sleep 1000")),
            sandbox_config: Some(sandbox_config),
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {}", daemon.log()))?
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await?;
    let exec = |cmd: &[&str], tty: bool| cri::ExecRequest {
        container_id: id.clone(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin: true,
        stdout: true,
        stderr: !tty,
    };

    // v5: stdin, its close, both outputs and a non-zero exit.
    let url = rt
        .exec(exec(
            &["sh", "-c", "read x; echo got $x; echo err >&2; exit 3"],
            false,
        ))
        .await?
        .into_inner()
        .url;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let mut ws = ws_connect(&daemon.node, &url, "v5.channel.k8s.io")
        .await?
        .map_err(|e| anyhow::anyhow!("{e}: {}", daemon.log()))?;
    ws.send(frame(0, b"hello\n")).await?;
    ws.send(frame(255, &[0])).await?;
    let out = ws_collect(&mut ws).await?;
    assert_eq!(out.stdout, "got hello\n", "{out:?}");
    assert_eq!(out.stderr, "err\n", "{out:?}");
    let status: serde_json::Value = serde_json::from_str(&out.status)?;
    assert_eq!(status["status"], "Failure", "{status}");
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    assert_eq!(status["details"]["causes"][0]["message"], "3", "{status}");

    // The token worked once; unknown tokens are not found either.
    for url in [url.clone(), url.replace("/exec/", "/exec/0")] {
        match ws_connect(&daemon.node, &url, "v5.channel.k8s.io").await? {
            Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 404),
            other => bail!("{url}: {other:?}"),
        }
    }

    // v4, tty: a resize applies to the pty before the command reads it.
    let url = rt
        .exec(exec(&["sh", "-c", "read x; stty size"], true))
        .await?
        .into_inner()
        .url;
    let mut ws = ws_connect(&daemon.node, &url, "v4.channel.k8s.io")
        .await?
        .map_err(|e| anyhow::anyhow!("{e}: {}", daemon.log()))?;
    ws.send(frame(4, br#"{"Width":123,"Height":45}"#)).await?;
    ws.send(frame(0, b"\n")).await?;
    let out = ws_collect(&mut ws).await?;
    assert!(out.stdout.contains("45 123"), "{out:?}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out.status)?["status"],
        "Success",
        "{out:?}"
    );

    // A stopped container has nothing to exec in.
    rt.stop_container(cri::StopContainerRequest {
        container_id: id.clone(),
        timeout: 0,
    })
    .await?;
    let refused = rt.exec(exec(&["true"], false)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await?;
    Ok(())
}

/// The client side of SPDY/3.1 as client-go speaks it, on our own codec.
struct SpdyClient {
    stream: tokio::net::TcpStream,
    encoder: spdy::HeaderEncoder,
    decoder: spdy::HeaderDecoder,
    next_id: u32,
}

/// What arrived on each stream, and whether it was closed.
#[derive(Debug, Default)]
struct Received {
    data: Vec<u8>,
    fin: bool,
}

impl SpdyClient {
    /// POSTs the upgrade to `url` offering `protocol`; fails unless the
    /// server switches to SPDY with it.
    async fn connect(node: &NodeNs, url: &str, protocol: &str) -> Result<Self> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rest = url.strip_prefix("http://").context("not http")?;
        let (addr, path) = rest.split_once('/').context("URL without path")?;
        let mut stream = node_connect(node, addr.to_owned())?;
        let request = format!(
            "POST /{path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
             X-Stream-Protocol-Version: {protocol}\r\nContent-Length: 0\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8];
            ensure!(stream.read(&mut byte).await? == 1, "EOF in response head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        ensure!(head.starts_with("http/1.1 101"), "{head}");
        ensure!(
            head.contains(&format!("x-stream-protocol-version: {protocol}")),
            "{head}"
        );
        Ok(Self {
            stream,
            encoder: spdy::HeaderEncoder::new(),
            decoder: spdy::HeaderDecoder::new(),
            next_id: 1,
        })
    }

    /// Opens a stream (client IDs are odd).
    async fn open(&mut self, headers: &[(&str, &str)]) -> Result<u32> {
        use tokio::io::AsyncWriteExt;
        let id = self.next_id;
        self.next_id += 2;
        let frame = spdy::syn_stream(id, headers, &mut self.encoder);
        self.stream.write_all(&frame).await?;
        Ok(id)
    }

    async fn send(&mut self, id: u32, data: &[u8], fin: bool) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stream
            .write_all(&spdy::data_frame(id, fin, data))
            .await?;
        Ok(())
    }

    /// Reads until every stream in `ids` is closed by the server, or the
    /// connection ends (`ids` empty: until then).
    async fn collect(&mut self, ids: &[u32]) -> Result<HashMap<u32, Received>> {
        let mut got: HashMap<u32, Received> = HashMap::new();
        let done = |got: &HashMap<u32, Received>| {
            !ids.is_empty() && ids.iter().all(|id| got.get(id).is_some_and(|r| r.fin))
        };
        while !done(&got) {
            let frame = tokio::time::timeout(
                Duration::from_secs(20),
                spdy::read_frame(&mut self.stream, &mut self.decoder),
            )
            .await
            .context("SPDY read timed out")??;
            match frame {
                None | Some(spdy::Frame::GoAway) => break,
                Some(spdy::Frame::Data { id, fin, data }) => {
                    let entry = got.entry(id).or_default();
                    entry.data.extend_from_slice(&data);
                    entry.fin |= fin;
                }
                Some(spdy::Frame::RstStream { id, status }) => bail!("stream {id} reset: {status}"),
                Some(_) => {}
            }
        }
        Ok(got)
    }
}

fn text(got: &HashMap<u32, Received>, id: u32) -> String {
    got.get(&id)
        .map(|r| String::from_utf8_lossy(&r.data).into_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_attach_and_port_forward_over_spdy() -> Result<()> {
    if !require_root("bosun-cri end to end") {
        return Ok(());
    }
    let daemon = Daemon::new("10.234.0.0/24").await?;
    let mut rt = RuntimeServiceClient::new(daemon.channel().await?);
    let logs = daemon.dir.path().join("pod-logs");
    let sandbox_config = pod_config("spdy", &logs);
    let pod = run_pod(&mut rt, &sandbox_config).await?;
    let mut shell = container_config("shell", "");
    shell.command = vec!["sh".into()];
    shell.stdin = true;
    shell.stdin_once = true;
    let web = container_config(
        "web",
        "mkdir -p /www && echo hello-from-pod > /www/index.html && exec httpd -f -p 8080 -h /www",
    );
    let mut ids = Vec::new();
    for config in [shell, web] {
        let id = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(config),
                sandbox_config: Some(sandbox_config.clone()),
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}: {}", daemon.log()))?
            .into_inner()
            .container_id;
        rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await?;
        ids.push(id);
    }
    let (shell, web) = (ids[0].clone(), ids[1].clone());

    // Exec, v4: stdin with its FIN, both outputs, the status on the error
    // stream.
    let url = rt
        .exec(cri::ExecRequest {
            container_id: web.clone(),
            cmd: ["sh", "-c", "read x; echo got $x; echo err >&2; exit 3"]
                .map(String::from)
                .to_vec(),
            tty: false,
            stdin: true,
            stdout: true,
            stderr: true,
        })
        .await?
        .into_inner()
        .url;
    let mut client = SpdyClient::connect(&daemon.node, &url, "v4.channel.k8s.io").await?;
    let error = client.open(&[("streamType", "error")]).await?;
    let stdin = client.open(&[("streamType", "stdin")]).await?;
    let stdout = client.open(&[("streamType", "stdout")]).await?;
    let stderr = client.open(&[("streamType", "stderr")]).await?;
    client.send(stdin, b"hello\n", true).await?;
    let got = client.collect(&[]).await?;
    assert_eq!(text(&got, stdout), "got hello\n", "{got:?}");
    assert_eq!(text(&got, stderr), "err\n", "{got:?}");
    let status: serde_json::Value = serde_json::from_str(&text(&got, error))?;
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    assert_eq!(status["details"]["causes"][0]["message"], "3", "{status}");
    assert!(got.values().all(|r| r.fin), "every stream ends: {got:?}");

    // Attach: input reaches the shell; closing stdin ends a stdin_once
    // container, and with it the session.
    let url = rt
        .attach(cri::AttachRequest {
            container_id: shell.clone(),
            stdin: true,
            tty: false,
            stdout: true,
            stderr: true,
        })
        .await?
        .into_inner()
        .url;
    let mut client = SpdyClient::connect(&daemon.node, &url, "v4.channel.k8s.io").await?;
    let error = client.open(&[("streamType", "error")]).await?;
    let stdin = client.open(&[("streamType", "stdin")]).await?;
    let stdout = client.open(&[("streamType", "stdout")]).await?;
    let stderr = client.open(&[("streamType", "stderr")]).await?;
    client
        .send(stdin, b"echo attached; echo oops >&2\n", true)
        .await?;
    let got = client.collect(&[]).await?;
    assert_eq!(text(&got, stdout), "attached\n", "{got:?}");
    assert_eq!(text(&got, stderr), "oops\n", "{got:?}");
    let status: serde_json::Value = serde_json::from_str(&text(&got, error))?;
    assert_eq!(status["status"], "Success", "{status}");
    let exited = wait_state(&mut rt, &shell, cri::ContainerState::ContainerExited).await?;
    assert_eq!(exited.exit_code, 0);
    // Attaching needs a running container, and stdin one created with it.
    let refused = rt
        .attach(cri::AttachRequest {
            container_id: shell.clone(),
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    let refused = rt
        .attach(cri::AttachRequest {
            container_id: web.clone(),
            stdin: true,
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // Port forward: two connections on one SPDY session, to the web
    // server in the pod's netns and to a port nobody listens on.
    let url = rt
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod.clone(),
            port: vec![8080],
        })
        .await?
        .into_inner()
        .url;
    let mut client = SpdyClient::connect(&daemon.node, &url, "portforward.k8s.io").await?;
    let mut served = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    for attempt in 0.. {
        // httpd may not listen yet.
        let request = attempt.to_string();
        let error = client
            .open(&[
                ("streamType", "error"),
                ("port", "8080"),
                ("requestID", &request),
            ])
            .await?;
        let data = client
            .open(&[
                ("streamType", "data"),
                ("port", "8080"),
                ("requestID", &request),
            ])
            .await?;
        client
            .send(data, b"GET /index.html HTTP/1.0\r\n\r\n", true)
            .await?;
        let got = client.collect(&[error, data]).await?;
        if text(&got, error).is_empty() {
            served = Some(text(&got, data));
            break;
        }
        ensure!(Instant::now() < deadline, "{}", text(&got, error));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let served = served.context("no response")?;
    assert!(served.starts_with("HTTP/1.1 200 OK"), "{served}");
    assert!(served.contains("hello-from-pod"), "{served}");
    let error = client
        .open(&[("streamType", "error"), ("port", "9"), ("requestID", "x")])
        .await?;
    let data = client
        .open(&[("streamType", "data"), ("port", "9"), ("requestID", "x")])
        .await?;
    let got = client.collect(&[error, data]).await?;
    let message = text(&got, error);
    assert!(
        message.contains("error forwarding port 9") && message.contains("refused"),
        "{message}"
    );

    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await?;
    let refused = rt
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod.clone(),
            port: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_create_undoes_it_at_start() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !require_root("bosun-cri end to end") {
        return Ok(());
    }
    let mut daemon = Daemon::new("10.235.0.0/24").await?;
    let root = daemon.dir.path().to_owned();
    let bins = daemon.bins.clone();
    // Wrappers that do the real work, then linger: the daemon gets killed
    // while it waits for them.
    let slow = root.join("slow");
    fs::create_dir_all(&slow)?;
    let scripts = [
        (
            "slow-cni",
            format!(
                "#!/bin/sh\n{}/bosun-cni; rc=$?\n[ \"$CNI_COMMAND\" = ADD ] && sleep 3\nexit $rc\n",
                bins.display()
            ),
        ),
        (
            "slow-runc",
            format!(
                "#!/bin/sh\n{}/bosun-runc \"$@\"; rc=$?\ncase \" $* \" in *\" create \"*) sleep 3;; esac\nexit $rc\n",
                bins.display()
            ),
        ),
    ];
    for (name, script) in scripts {
        fs::write(slow.join(name), script)?;
        fs::set_permissions(slow.join(name), fs::Permissions::from_mode(0o755))?;
    }
    let conflist = root.join("net.d/10-bosun.conflist");
    fs::write(
        &conflist,
        fs::read_to_string(&conflist)?.replace("\"bosun-cni\"", "\"slow-cni\""),
    )?;
    let config = fs::read_to_string(daemon.config_path())?.replace(
        "cni_bin_dirs = [",
        &format!("cni_bin_dirs = [\"{}\", ", slow.display()),
    );
    fs::write(
        daemon.config_path(),
        format!(
            "{config}[runtimes.slow]\npath = \"{}/slow-runc\"\nroot = \"{}/state/runtime/slow\"\n",
            slow.display(),
            root.display()
        ),
    )?;
    daemon.kill9();
    daemon.start()?;
    let logs = root.join("pod-logs");
    let run = |name: &str| cri::RunPodSandboxRequest {
        config: Some(pod_config(name, &logs)),
        runtime_handler: "slow".into(),
    };
    let mut rt = RuntimeServiceClient::new(daemon.channel().await?);
    let pod = rt
        .run_pod_sandbox(run("kept"))
        .await?
        .into_inner()
        .pod_sandbox_id;
    let ipam = root.join("ipam/e2e");
    let ips = || -> Result<usize> {
        Ok(fs::read_dir(&ipam)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("10."))
            .count())
    };
    let pins = || -> Result<usize> { Ok(fs::read_dir(root.join("state/ns"))?.count()) };
    assert_eq!((ips()?, pins()?), (1, 1));

    // Killed while CNI ADD lingers: the address and the pinned namespaces
    // of the half-made sandbox exist.
    let mut in_flight = RuntimeServiceClient::new(daemon.channel().await?);
    let request = run("killed");
    let call = tokio::spawn(async move { in_flight.run_pod_sandbox(request).await });
    host::poll(Duration::from_secs(10), || (ips().ok()? == 2).then_some(()))
        .context("second pod never got an address")?;
    daemon.kill9();
    let _ = call.await;
    daemon.start()?;
    let mut rt = RuntimeServiceClient::new(daemon.channel().await?);
    let listed = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await?
        .into_inner()
        .items;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((ips()?, pins()?), (1, 1), "{}", daemon.log());
    let veths = daemon
        .node
        .exec(&["ip", "-o", "link", "show", "type", "veth"])?;
    assert_eq!(veths.lines().count(), 1, "{veths}");
    // The name is free again.
    let again = rt
        .run_pod_sandbox(run("killed"))
        .await?
        .into_inner()
        .pod_sandbox_id;

    // Killed while the runtime's create lingers: the container exists in
    // the runtime and a monitor waits for it.
    let sandbox_config = pod_config("kept", &logs);
    let create = cri::CreateContainerRequest {
        pod_sandbox_id: pod.clone(),
        config: Some(container_config("sleeper", "exec sleep 1000")),
        sandbox_config: Some(sandbox_config.clone()),
    };
    let mut in_flight = RuntimeServiceClient::new(daemon.channel().await?);
    let request = create.clone();
    let call = tokio::spawn(async move { in_flight.create_container(request).await });
    let runtime_root = root.join("state/runtime/slow");
    let listed_by_runtime = || -> Result<String> {
        let out = Command::new(bins.join("bosun-runc"))
            .arg("--root")
            .arg(&runtime_root)
            .args(["list", "-q"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    host::poll(Duration::from_secs(10), || {
        (!listed_by_runtime().ok()?.is_empty()).then_some(())
    })
    .context("the runtime never created the container")?;
    daemon.kill9();
    let _ = call.await;
    daemon.start()?;
    let mut rt = RuntimeServiceClient::new(daemon.channel().await?);
    let containers = rt
        .list_containers(cri::ListContainersRequest::default())
        .await?
        .into_inner()
        .containers;
    assert!(containers.is_empty(), "{containers:?}");
    assert_eq!(listed_by_runtime()?, "", "{}", daemon.log());
    let left: Vec<_> = fs::read_dir(root.join("state/c"))?.collect();
    assert!(left.is_empty(), "{left:?}");
    // The lingering wrapper, and the monitor waiting for it, end soon after.
    let marker = root.join("state/c").display().to_string();
    let lingering = host::poll(Duration::from_secs(10), || {
        host::processes_with(&marker).ok()?.is_empty().then_some(())
    });
    assert!(lingering.is_some(), "{:?}", host::processes_with(&marker));
    // The name is free again and the container runs.
    let id = rt.create_container(create).await?.into_inner().container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await?;
    wait_state(&mut rt, &id, cri::ContainerState::ContainerRunning).await?;

    for pod_sandbox_id in [pod, again] {
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod_sandbox_id.clone(),
        })
        .await?;
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id })
            .await?;
    }
    assert_eq!((ips()?, pins()?), (0, 0));
    Ok(())
}
