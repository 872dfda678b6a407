//! Test support: runs the real `partyhost` binary on an ephemeral port of
//! 127.0.0.1 and talks to it with real WebSocket and HTTP clients.
//!
//! Components come from the example rooms, which the host's build script
//! compiles for wasm32-wasip2 into `PARTYHOST_EXAMPLES_DIR`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a test waits for any one thing the server should do.
pub const WAIT: Duration = Duration::from_secs(10);

/// Path of an example room component.
pub fn example(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("PARTYHOST_EXAMPLES_DIR")).join(format!("{name}.wasm"));
    assert!(path.exists(), "example component {} was not built", path.display());
    path
}

/// A running `partyhost` process. Killed when dropped.
pub struct Server {
    pub addr: SocketAddr,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    /// The `--data-dir` of a test that chose none, removed when the server
    /// is dropped.
    _data_dir: tempfile::TempDir,
}

impl Server {
    /// Starts the server with the default room.
    pub fn start(args: &[&str]) -> Server {
        Server::try_start(args).unwrap_or_else(|(status, logs)| {
            panic!("partyhost exited with {status:?} before listening:\n{}", logs.join("\n"))
        })
    }

    /// Starts the server with an example room.
    pub fn with_example(name: &str, args: &[&str]) -> Server {
        let module = example(name);
        let mut all = vec!["--module", module.to_str().expect("UTF-8 path")];
        all.extend_from_slice(args);
        Server::start(&all)
    }

    /// Starts the server; returns its exit status and log if it exits
    /// before it listens.
    pub fn try_start(args: &[&str]) -> Result<Server, (Option<ExitStatus>, Vec<String>)> {
        let data_dir = tempfile::tempdir().expect("failed to create a temporary data directory");
        let mut command = Command::new(env!("CARGO_BIN_EXE_partyhost"));
        command.args(["--listen", "127.0.0.1:0"]);
        if !args.contains(&"--data-dir") {
            command.arg("--data-dir").arg(data_dir.path());
        }
        let mut child = command
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to start the partyhost binary");

        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("stderr is piped");
        let collected = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = address_after(&line, "partyhost listening on http://") {
                    let _ = addr_tx.send(Some(addr));
                }
                collected.lock().unwrap().push(line);
            }
        });

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(addr)) = addr_rx.recv_timeout(Duration::from_millis(20)) {
                return Ok(Server { addr, child, logs, _data_dir: data_dir });
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Let the reader thread drain what the process printed.
                std::thread::sleep(Duration::from_millis(100));
                let logs = logs.lock().unwrap().clone();
                return Err((Some(status), logs));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err((None, logs.lock().unwrap().clone()));
            }
        }
    }

    /// Address of the admin listener, from its start-up log line.
    pub async fn admin_addr(&self) -> SocketAddr {
        let line = self.wait_for_log(&["admin listening on http://"]).await;
        address_after(&line, "admin listening on http://").expect("the admin log line names its address")
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits until a log line contains every one of `needles`.
    pub async fn wait_for_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.logs().into_iter().find(|line| needles.iter().all(|n| line.contains(n))) {
                return line;
            }
            assert!(Instant::now() < deadline, "no log line contains {needles:?}:\n{}", self.logs().join("\n"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().expect("failed to run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("failed to wait for partyhost") {
                return status;
            }
            assert!(Instant::now() < deadline, "partyhost did not exit within 30 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses the socket address that follows `marker` in a log line, in text
/// or JSON format.
fn address_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = line.split(marker).nth(1)?;
    let addr: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':').collect();
    addr.parse().ok()
}

/// Runs the binary with `args` to completion; returns its exit status and
/// stderr.
pub fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    let data_dir = tempfile::tempdir().expect("failed to create a temporary data directory");
    let mut command = Command::new(env!("CARGO_BIN_EXE_partyhost"));
    command.args(["--listen", "127.0.0.1:0"]);
    if !args.contains(&"--data-dir") {
        command.arg("--data-dir").arg(data_dir.path());
    }
    let output = command
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("failed to run the partyhost binary");
    (output.status, String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Opens a WebSocket, panicking with the server's response on failure.
pub async fn connect(url: &str) -> Socket {
    let (socket, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .unwrap_or_else(|_| panic!("connecting to {url} timed out"))
        .unwrap_or_else(|err| panic!("connecting to {url} failed: {err}"));
    socket
}

/// Receives the next text or binary message, skipping pings and pongs.
pub async fn recv(socket: &mut Socket) -> Message {
    loop {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("timed out waiting for a message")
            .expect("socket ended while waiting for a message")
            .expect("socket failed while waiting for a message");
        match message {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

/// Receives the next message and returns it as text.
pub async fn recv_text(socket: &mut Socket) -> String {
    match recv(socket).await {
        Message::Text(text) => text.to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// Asserts that no text or binary message arrives within `quiet`.
pub async fn assert_silent(socket: &mut Socket, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => panic!("expected no message, got {other:?}"),
        }
    }
}

/// Waits for the server's close frame; returns its code and reason.
pub async fn recv_close(socket: &mut Socket) -> (u16, String) {
    loop {
        let message = tokio::time::timeout(WAIT, socket.next()).await.expect("timed out waiting for a close frame");
        match message {
            Some(Ok(Message::Close(Some(frame)))) => return (u16::from(frame.code), frame.reason.to_string()),
            Some(Ok(Message::Close(None))) => return (u16::from(CloseCode::Status), String::new()),
            Some(Ok(_)) => continue,
            Some(Err(err)) => panic!("socket failed before a close frame: {err}"),
            None => panic!("socket ended without a close frame"),
        }
    }
}

pub async fn send_text(socket: &mut Socket, text: &str) {
    socket.send(Message::text(text)).await.expect("failed to send a text message");
}

/// Makes an HTTP request; returns the status and the body as text.
pub async fn request(method: &str, url: &str, body: &str) -> (u16, String) {
    let client = reqwest::Client::new();
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("valid method");
    let response = tokio::time::timeout(WAIT, client.request(method, url).body(body.to_string()).send())
        .await
        .unwrap_or_else(|_| panic!("request to {url} timed out"))
        .unwrap_or_else(|err| panic!("request to {url} failed: {err}"));
    let status = response.status().as_u16();
    let body = response.text().await.expect("failed to read the response body");
    (status, body)
}

/// Parses a JSON text.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
}

/// A WebSocket client written by hand over TCP, for what a well-behaved
/// client library refuses to do: send invalid frames, or stop reading and
/// writing without closing the connection.
pub struct RawSocket {
    pub stream: std::net::TcpStream,
}

impl RawSocket {
    /// Completes the opening handshake and returns the socket, or the
    /// server's status line when it answered anything but 101.
    pub fn connect(addr: SocketAddr, path: &str) -> Result<RawSocket, String> {
        use std::io::{Read, Write};

        let mut stream = std::net::TcpStream::connect(addr).expect("failed to connect over TCP");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let handshake = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(handshake.as_bytes()).unwrap();

        // Read the response head byte by byte so no frame after it is lost.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let read = stream.read(&mut byte).expect("failed to read the handshake response");
            assert_eq!(read, 1, "server closed during the handshake");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let status_line = head.lines().next().unwrap_or_default().to_string();
        if !status_line.contains(" 101 ") {
            return Err(status_line);
        }
        Ok(RawSocket { stream })
    }

    /// Sends one masked frame with the given opcode.
    pub fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        use std::io::Write;

        assert!(payload.len() < 126, "RawSocket sends short frames only");
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, byte)| byte ^ mask[i % 4]));
        self.stream.write_all(&frame).unwrap();
    }

    /// Reads frames until a close frame; returns its code. Panics if the
    /// connection ends first or the frame has no code.
    pub fn read_close_code(&mut self) -> u16 {
        self.read_close().expect("close frame without a code")
    }

    /// Reads frames until a close frame; returns its code, or `None` for a
    /// close frame without one. Panics if the connection ends first.
    pub fn read_close(&mut self) -> Option<u16> {
        use std::io::Read;

        loop {
            let mut header = [0u8; 2];
            self.stream.read_exact(&mut header).expect("connection ended before a close frame");
            let opcode = header[0] & 0x0f;
            let mut length = (header[1] & 0x7f) as u64;
            if length == 126 {
                let mut extended = [0u8; 2];
                self.stream.read_exact(&mut extended).unwrap();
                length = u16::from_be_bytes(extended) as u64;
            } else if length == 127 {
                let mut extended = [0u8; 8];
                self.stream.read_exact(&mut extended).unwrap();
                length = u64::from_be_bytes(extended);
            }
            let mut payload = vec![0u8; length as usize];
            self.stream.read_exact(&mut payload).unwrap();
            if opcode == 0x8 {
                if payload.len() < 2 {
                    return None;
                }
                return Some(u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    }
}
