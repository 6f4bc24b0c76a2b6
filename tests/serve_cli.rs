//! `protloc serve` as a process: starts, answers, and exits cleanly on SIGTERM.

mod serve_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serve_support::*;

#[cfg(unix)]
#[test]
fn serve_command_answers_and_stops_on_sigterm() {
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("protloc"))
        .args(["serve", "--port", "0", "--max-wait-ms", "1", "--model"])
        .arg(model_dir())
        .env("PROTLOC_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let addr = loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("server exited before listening:\n{log}");
        }
        log.push_str(&line);
        if let Some(rest) = line.split("listening on http://").nth(1) {
            // Stop at the first character that cannot be part of host:port (colour codes).
            break rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || ".:[]".contains(*c))
                .collect::<String>();
        }
    };
    let a = agent();
    assert_eq!(get(&a, &format!("http://{addr}/ping")).status, 200);
    let r = post(
        &a,
        &format!("http://{addr}/invocations"),
        Some("text/x-fasta"),
        &[],
        ">P1\nMKTAYIAKQR\n",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["predictions"][0]["id"], "P1");

    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    log.push_str(&rest);
    assert!(status.success(), "exit {status:?}\n{log}");
    assert!(log.contains("shutting down"), "{log}");
    assert!(std::net::TcpStream::connect(&addr).is_err());
}
