//! A room that misbehaves on command, so tests can provoke each failure mode
//! of a guest and check that the host contains it.
//!
//! A command is the text of a WebSocket message or the body of an HTTP
//! request:
//! - `echo <text>`: answers `<text>` (a well-behaved call);
//! - `panic`: panics, which traps the instance;
//! - `loop`: spins forever, until the host's call deadline interrupts it;
//! - `alloc`: allocates memory without bound, until growth fails;
//! - `recurse`: recurses without bound, until the stack overflows;
//! - `flood <n>`: broadcasts `n` messages of 1 KiB each;
//! - `spin <ms>`: keeps the CPU busy for `ms` milliseconds, then answers;
//! - `count`: answers how many calls this instance has served, which shows
//!   whether the host restarted it;
//! - `connections`: answers how many connections the room has open;
//! - `store <key bytes> <value bytes>`: puts a value of that size under a
//!   key of that length, and answers `stored` or the host's error;
//! - `list <limit>`: lists storage with that limit, and answers the number
//!   of entries or the host's error;
//! - `batch <n>`: commits a batch of `n` deletes, and answers `committed`
//!   or the host's error;
//! - `big <bytes>`: broadcasts one message of that many bytes;
//! - `log <text>`: writes `<text>` to the host's log;
//! - `log-flood <n>`: writes `n` log lines in one call;
//! - `respond <status> [<header> <value>]` (HTTP only): answers the body
//!   `short` with that status and header, to test what the host lets through;
//! - `flaky <room> <text>` (HTTP only): the room with id `<room>` panics on
//!   the first attempt of a router request; every other call broadcasts
//!   `<text>` and answers `relayed`.
//!
//! Over a WebSocket, two more commands act on the sender:
//! - `set-state <bytes>`: stores a state of that many bytes (`s` repeated)
//!   and answers `state set` or the host's error;
//! - `set-state-text <text>`: stores `<text>` as the state.
//!
//! A WebSocket that passes `?tags=a,b,c` gets those tags.
//!
//! `on-start` logs `on-start <connection id> state=<state>` for each open
//! connection, `on-close` logs `on-close <connection id> <code> <reason>`
//! and `on-error` logs `on-error <connection id>: <error>`, so tests can see
//! that they ran and with what.
//!
//! A room whose id starts with `crash-on-start` panics in `on-start`, every
//! time.

use partyhost_sdk::storage::{self, Batch, ListOptions};
use partyhost_sdk::{export_room, Connection, LogLevel, Message, Request, Response, Room};

struct Faulty {
    calls: u64,
}

impl Faulty {
    fn run(&mut self, command: &str) -> String {
        self.calls += 1;
        let (verb, argument) = command.split_once(' ').unwrap_or((command, ""));
        match verb {
            "echo" => argument.to_string(),
            "panic" => panic!("the faulty room panics on command"),
            "loop" => spin(),
            "alloc" => allocate_forever(),
            "recurse" => format!("depth {}", recurse(0)),
            "flood" => {
                let count: usize = argument.parse().unwrap_or(0);
                let payload = "x".repeat(1024);
                for _ in 0..count {
                    partyhost_sdk::broadcast(payload.as_str());
                }
                format!("flooded {count}")
            }
            "spin" => {
                let millis: u64 = argument.parse().unwrap_or(0);
                let started = std::time::Instant::now();
                while started.elapsed() < std::time::Duration::from_millis(millis) {
                    std::hint::spin_loop();
                }
                format!("spun {millis}")
            }
            "big" => {
                let bytes: usize = argument.parse().unwrap_or(0);
                partyhost_sdk::broadcast("b".repeat(bytes));
                format!("broadcast {bytes} bytes")
            }
            "log" => {
                partyhost_sdk::log(LogLevel::Info, argument);
                "logged".to_string()
            }
            "log-flood" => {
                let lines: usize = argument.parse().unwrap_or(0);
                for i in 0..lines {
                    partyhost_sdk::log(LogLevel::Info, &format!("flood line {i}"));
                }
                format!("logged {lines}")
            }
            "count" => self.calls.to_string(),
            "connections" => partyhost_sdk::connections().len().to_string(),
            "store" => {
                let (key_len, value_len) = argument.split_once(' ').unwrap_or((argument, "0"));
                let key = "k".repeat(key_len.parse().unwrap_or(0));
                let value = vec![b'v'; value_len.parse().unwrap_or(0)];
                match storage::put(&key, value) {
                    Ok(()) => "stored".into(),
                    Err(err) => format!("error: {err}"),
                }
            }
            "list" => {
                let options = ListOptions {
                    limit: argument.parse().ok(),
                    ..ListOptions::default()
                };
                match storage::list(options) {
                    Ok(entries) => format!("listed {}", entries.len()),
                    Err(err) => format!("error: {err}"),
                }
            }
            "batch" => {
                let count: usize = argument.parse().unwrap_or(0);
                let batch = (0..count).fold(Batch::new(), |batch, i| batch.delete(&format!("key-{i}")));
                match batch.commit() {
                    Ok(()) => "committed".into(),
                    Err(err) => format!("error: {err}"),
                }
            }
            other => format!("unknown command `{other}`"),
        }
    }
}

fn set_state(connection: &Connection, state: Vec<u8>) -> String {
    match connection.set_state(state) {
        Ok(()) => "state set".into(),
        Err(err) => format!("error: {err}"),
    }
}

fn spin() -> ! {
    let mut counter: u64 = 0;
    loop {
        counter = std::hint::black_box(counter.wrapping_add(1));
    }
}

fn allocate_forever() -> ! {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = vec![0u8; 1 << 20];
        block[0] = 1;
        blocks.push(std::hint::black_box(block));
    }
}

/// Recurses until the WebAssembly call stack overflows. The frames live in
/// wasm locals only, so the call stack overflows before the shadow stack in
/// linear memory does.
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    std::hint::black_box(recurse(std::hint::black_box(depth + 1))) + 1
}

impl Room for Faulty {
    fn new() -> Self {
        if partyhost_sdk::room_id().starts_with("crash-on-start") {
            panic!("the faulty room panics in on-start for this room id");
        }
        Faulty { calls: 0 }
    }

    fn on_start(&mut self) {
        for connection in partyhost_sdk::connections() {
            let state = connection.state().map(|state| String::from_utf8_lossy(&state).into_owned());
            let line = format!("on-start {} state={}", connection.id(), state.unwrap_or_default());
            partyhost_sdk::log(LogLevel::Info, &line);
        }
    }

    fn connection_tags(&mut self, _connection: &Connection, request: &Request) -> Vec<String> {
        let tags = request.query("tags").unwrap_or_default();
        tags.split(',').filter(|tag| !tag.is_empty()).map(str::to_string).collect()
    }

    fn on_message(&mut self, sender: &Connection, message: Message) {
        let command = message.as_text().unwrap_or("");
        let reply = if let Some(text) = command.strip_prefix("set-state-text ") {
            set_state(sender, text.as_bytes().to_vec())
        } else if let Some(size) = command.strip_prefix("set-state ") {
            set_state(sender, vec![b's'; size.parse().unwrap_or(0)])
        } else {
            self.run(command)
        };
        sender.send(reply);
    }

    fn on_close(&mut self, connection: &Connection, code: u16, reason: &str) {
        partyhost_sdk::log(LogLevel::Info, &format!("on-close {} {code} {reason}", connection.id()));
    }

    fn on_error(&mut self, connection: &Connection, error: &str) {
        partyhost_sdk::log(LogLevel::Info, &format!("on-error {}: {error}", connection.id()));
    }

    fn on_request(&mut self, request: Request) -> Response {
        let command = request.text().unwrap_or("");
        if let Some(argument) = command.strip_prefix("respond ") {
            self.calls += 1;
            let mut parts = argument.splitn(3, ' ');
            let status = parts.next().and_then(|status| status.parse().ok()).unwrap_or(200);
            let mut response = Response::text(status, "short");
            if let (Some(name), Some(value)) = (parts.next(), parts.next()) {
                response = response.with_header(name, value);
            }
            return response;
        }
        if let Some(argument) = command.strip_prefix("flaky ") {
            let (target, text) = argument.split_once(' ').unwrap_or((argument, ""));
            let first_attempt = request.header("x-partyhost-attempt") == Some("1");
            if first_attempt && partyhost_sdk::room_id() == target {
                panic!("the faulty room fails the first attempt on command");
            }
            partyhost_sdk::broadcast(text);
            return Response::text(200, "relayed");
        }
        let reply = self.run(command);
        Response::text(200, reply)
    }
}

export_room!(Faulty);
