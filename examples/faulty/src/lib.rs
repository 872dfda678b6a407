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
//! - `connections`: answers how many connections the room has open.
//!
//! `on-close` logs `on-close <connection id>`, so tests can see it ran.
//!
//! A room whose id starts with `crash-on-start` panics in `on-start`, every
//! time.

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
            "count" => self.calls.to_string(),
            "connections" => partyhost_sdk::connections().len().to_string(),
            other => format!("unknown command `{other}`"),
        }
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

    fn on_message(&mut self, sender: &Connection, message: Message) {
        let reply = self.run(message.as_text().unwrap_or(""));
        sender.send(reply);
    }

    fn on_close(&mut self, connection: &Connection) {
        partyhost_sdk::log(LogLevel::Info, &format!("on-close {}", connection.id()));
    }

    fn on_request(&mut self, request: Request) -> Response {
        let reply = self.run(request.text().unwrap_or(""));
        Response::text(200, reply)
    }
}

export_room!(Faulty);
