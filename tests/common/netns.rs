//! Network namespaces of a test's own (`ip netns`), each deleted when dropped, pass or fail.
//! Needs root and iproute2 (scripts/setup-test-deps.sh installs it).

use std::process::Command;

/// Runs `ip ARGS`, panicking with its output if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    super::assert_succeeded(&out, &format!("ip {}", args.join(" ")));
}

/// A namespace `chorus-<tag>-<pid>` with its lo up.
pub struct NetNs(String);

impl NetNs {
    pub fn create(tag: &str) -> NetNs {
        let name = format!("chorus-{tag}-{}", std::process::id());
        // A namespace left by an earlier run of the same pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = NetNs(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// `tc -n NS ARGS`, panicking with its output if it fails.
    pub fn tc(&self, args: &[&str]) {
        let out = Command::new("tc")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .expect("tc runs");
        super::assert_succeeded(&out, &format!("tc -n {} {}", self.0, args.join(" ")));
    }

    /// Gives interface `dev` the address `addr` (CIDR) and brings it up.
    pub fn address(&self, dev: &str, addr: &str) {
        self.ip(&["addr", "add", addr, "dev", dev]);
        self.ip(&["link", "set", dev, "up"]);
    }

    /// `ip netns exec NS program`: the namespace's process is `program` itself (ip execs it).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A veth pair from `a` (interface `a_dev`, address `a_addr`) to `b` (`b_dev`, `b_addr`), both
/// up, each side's default route through the other (addresses in CIDR, one /24).
pub fn link(a: &NetNs, a_dev: &str, a_addr: &str, b: &NetNs, b_dev: &str, b_addr: &str) {
    a.ip(&[
        "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", &b.0,
    ]);
    a.address(a_dev, a_addr);
    b.address(b_dev, b_addr);
    let host = |cidr: &str| cidr.split('/').next().unwrap().to_owned();
    a.ip(&[
        "route",
        "add",
        "default",
        "via",
        &host(b_addr),
        "dev",
        a_dev,
    ]);
    b.ip(&[
        "route",
        "add",
        "default",
        "via",
        &host(a_addr),
        "dev",
        b_dev,
    ]);
}
