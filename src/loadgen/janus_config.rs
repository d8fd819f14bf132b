//! `chorus loadgen janus-config`: a complete, minimal Janus configuration in one directory, for
//! the load test's side-by-side run. Nothing global is read or written: Janus runs as
//! `janus -F DIR -C DIR/janus.jcfg`, its plugin and transport folders hold links to the only
//! two libraries it needs (the streaming plugin and the WebSocket transport), and one RTP
//! mountpoint has as many Opus streams as the viewers have tracks.
//!
//! Janus gathers no ICE candidates on loopback interfaces (it skips them), so its candidate is
//! one IPv4 address of this machine (`ice_enforce_list`); traffic to the machine's own address
//! still goes through the kernel's loopback path. The API socket and the RTP ports bind
//! 127.0.0.1.

use std::net::{IpAddr, Ipv4Addr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// The mountpoint's id in the streaming plugin's config.
pub const MOUNTPOINT: u64 = 1;
/// Opus payload type of every stream (the corpus feed sends it, Janus offers it).
pub const OPUS_PT: u8 = 111;
const PLUGIN: &str = "libjanus_streaming.so";
const TRANSPORT: &str = "libjanus_websockets.so";
/// Where Debian (and a source build's default prefix) install Janus's libraries.
const LIB_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/janus",
    "/usr/lib/aarch64-linux-gnu/janus",
    "/usr/lib/janus",
    "/usr/local/lib/janus",
    "/opt/janus/lib/janus",
];

/// What the files say.
#[derive(Debug, Clone)]
pub(crate) struct JanusConfig {
    pub dir: PathBuf,
    /// Holds `plugins/` and `transports/` with Janus's libraries.
    pub lib_dir: PathBuf,
    pub ws_port: u16,
    /// One per stream of the mountpoint.
    pub rtp_ports: Vec<u16>,
    /// The address Janus's ICE candidates use.
    pub ice_ip: IpAddr,
    /// Janus's static event loops (threads that do every handle's media); 0 keeps Janus's
    /// default of a thread per handle.
    pub event_loops: usize,
}

/// (file name, contents) of the three configuration files.
pub(crate) fn files(c: &JanusConfig) -> Vec<(&'static str, String)> {
    let d = c.dir.display();
    let loops = if c.event_loops > 0 {
        format!("\tevent_loops = {}\n", c.event_loops)
    } else {
        String::new()
    };
    let core = format!(
        "# Written by `chorus loadgen janus-config`: the load test's Janus, nothing else.\n\
         general: {{\n\
         \tconfigs_folder = \"{d}\"\n\
         \tplugins_folder = \"{d}/plugins\"\n\
         \ttransports_folder = \"{d}/transports\"\n\
         \tevents_folder = \"{d}/none\"\n\
         \tloggers_folder = \"{d}/none\"\n\
         \t# Warnings and errors only, as chorus runs in the load test (CHORUS_LOG=warn).\n\
         \tdebug_level = 3\n\
         \tserver_name = \"chorus-loadtest\"\n\
         \thide_dependencies = true\n\
         {loops}}}\n\
         certificates: {{\n}}\n\
         media: {{\n}}\n\
         nat: {{\n\
         \tice_enforce_list = \"{ip}\"\n\
         }}\n\
         plugins: {{\n}}\n\
         transports: {{\n}}\n\
         loggers: {{\n}}\n\
         events: {{\n}}\n",
        ip = c.ice_ip,
    );
    let ws = format!(
        "general: {{\n\
         \tjson = \"plain\"\n\
         \tws = true\n\
         \tws_port = {}\n\
         \tws_ip = \"127.0.0.1\"\n\
         \twss = false\n\
         }}\n\
         admin: {{\n\
         \tadmin_ws = false\n\
         \tadmin_wss = false\n\
         }}\n",
        c.ws_port
    );
    let media: Vec<String> = c
        .rtp_ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            format!(
                "\t\t{{\n\t\t\ttype = \"audio\"\n\t\t\tmid = \"a{i}\"\n\t\t\tlabel = \"track {i}\"\n\
                 \t\t\tport = {port}\n\t\t\tiface = \"127.0.0.1\"\n\t\t\tpt = {OPUS_PT}\n\
                 \t\t\tcodec = \"opus\"\n\t\t}}"
            )
        })
        .collect();
    let streaming = format!(
        "general: {{\n\
         \tevents = false\n\
         }}\n\
         chorus-loadgen: {{\n\
         \ttype = \"rtp\"\n\
         \tid = {MOUNTPOINT}\n\
         \tdescription = \"chorus loadgen: {n} corpus speakers, one per stream\"\n\
         \tmedia = (\n{media}\n\t)\n\
         }}\n",
        n = c.rtp_ports.len(),
        media = media.join(",\n"),
    );
    vec![
        ("janus.jcfg", core),
        ("janus.transport.websockets.jcfg", ws),
        ("janus.plugin.streaming.jcfg", streaming),
    ]
}

/// A directory of Janus's libraries that holds both the plugin and the transport.
pub(crate) fn find_lib_dir(given: Option<&Path>) -> Result<PathBuf, String> {
    let has = |d: &Path| {
        d.join("plugins").join(PLUGIN).exists() && d.join("transports").join(TRANSPORT).exists()
    };
    if let Some(d) = given {
        return if has(d) {
            Ok(d.to_owned())
        } else {
            Err(format!(
                "{} holds no plugins/{PLUGIN} and transports/{TRANSPORT}",
                d.display()
            ))
        };
    }
    LIB_DIRS
        .iter()
        .map(PathBuf::from)
        .find(|d| has(d))
        .ok_or_else(|| {
            format!(
                "Janus's libraries are not in any of {LIB_DIRS:?}: install Janus \
                 (scripts/setup-test-deps.sh installs Debian's janus) or pass --janus-lib"
            )
        })
}

/// The first IPv4 address of an interface that is up and not loopback.
pub(crate) fn host_ipv4() -> Option<Ipv4Addr> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return None;
    }
    let mut found = None;
    let mut p = ifap;
    while !p.is_null() {
        // SAFETY: p is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*p };
        let flags = ifa.ifa_flags;
        let up = flags & libc::IFF_UP as u32 != 0;
        let lo = flags & libc::IFF_LOOPBACK as u32 != 0;
        // SAFETY: a non-null ifa_addr points to a sockaddr whose family says its real type.
        if up
            && !lo
            && !ifa.ifa_addr.is_null()
            && unsafe { (*ifa.ifa_addr).sa_family } as i32 == libc::AF_INET
        {
            // SAFETY: AF_INET: the sockaddr is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            found = Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            break;
        }
        p = ifa.ifa_next;
    }
    // SAFETY: the list came from getifaddrs and is not used after this.
    unsafe { libc::freeifaddrs(ifap) };
    found
}

fn free_udp_port() -> Result<u16, String> {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free UDP port on loopback: {e}"))
}

/// Writes the configuration for `tracks` streams into `dir` (created if missing) on free
/// loopback ports; returns the JSON line the load test reads: the WebSocket URL, the
/// mountpoint, its RTP addresses and Janus's arguments.
pub fn write(
    dir: &Path,
    tracks: usize,
    lib: Option<&Path>,
    ice_ip: Option<IpAddr>,
    event_loops: usize,
) -> Result<Value, String> {
    if !(1..=16).contains(&tracks) {
        return Err("--tracks must be 1 to 16".into());
    }
    let lib_dir = find_lib_dir(lib)?;
    let ice_ip = match ice_ip {
        Some(ip) => ip,
        None => IpAddr::V4(host_ipv4().ok_or(
            "Janus gathers no candidates on loopback and this machine has no other IPv4 \
             interface up: pass --ice-ip",
        )?),
    };
    let io = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let dir = dir.canonicalize().map_err(|e| io(dir, e))?;
    let ws_port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free TCP port on loopback: {e}"))?;
    let mut rtp_ports = Vec::with_capacity(tracks);
    while rtp_ports.len() < tracks {
        let p = free_udp_port()?;
        if !rtp_ports.contains(&p) {
            rtp_ports.push(p);
        }
    }
    let c = JanusConfig {
        dir: dir.clone(),
        lib_dir,
        ws_port,
        rtp_ports,
        ice_ip,
        event_loops,
    };
    for (sub, lib) in [("plugins", PLUGIN), ("transports", TRANSPORT)] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
        let link = d.join(lib);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(c.lib_dir.join(sub).join(lib), &link)
            .map_err(|e| io(&link, e))?;
    }
    let none = dir.join("none");
    std::fs::create_dir_all(&none).map_err(|e| io(&none, e))?;
    for (name, text) in files(&c) {
        let f = dir.join(name);
        std::fs::write(&f, text).map_err(|e| io(&f, e))?;
    }
    let cfg = dir.join("janus.jcfg");
    Ok(json!({
        "dir": dir,
        "ws": format!("ws://127.0.0.1:{ws_port}/"),
        "mountpoint": MOUNTPOINT,
        "rtp": c.rtp_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>(),
        "ice_ip": ice_ip.to_string(),
        "event_loops": event_loops,
        "janus_args": ["-F", dir, "-C", cfg],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> JanusConfig {
        JanusConfig {
            dir: PathBuf::from("/tmp/lt/janus"),
            lib_dir: PathBuf::from("/usr/lib/janus"),
            ws_port: 18188,
            rtp_ports: vec![20000, 20002, 20004],
            ice_ip: IpAddr::from([192, 0, 2, 2]),
            event_loops: 1,
        }
    }

    /// The files name only the run's own directory and ports, one stream per track, and the
    /// braces balance (Janus's libconfig refuses the whole file otherwise).
    #[test]
    fn files_describe_one_mountpoint_with_a_stream_per_track() {
        let f = files(&config());
        assert_eq!(f.len(), 3);
        for (name, text) in &f {
            assert_eq!(
                text.matches('{').count(),
                text.matches('}').count(),
                "{name}"
            );
            assert_eq!(text.matches('(').count(), text.matches(')').count());
            assert!(!text.contains("/etc/janus"), "{name} reads nothing global");
        }
        let core = &f[0].1;
        assert!(core.contains("plugins_folder = \"/tmp/lt/janus/plugins\""));
        assert!(core.contains("event_loops = 1"));
        assert!(core.contains("ice_enforce_list = \"192.0.2.2\""));
        assert!(f[1].1.contains("ws_port = 18188") && f[1].1.contains("ws_ip = \"127.0.0.1\""));
        let s = &f[2].1;
        assert_eq!(s.matches("type = \"audio\"").count(), 3);
        for (i, p) in [20000, 20002, 20004].iter().enumerate() {
            assert!(s.contains(&format!("mid = \"a{i}\"")));
            assert!(s.contains(&format!("port = {p}")));
        }
        assert!(s.contains("id = 1") && s.contains("codec = \"opus\"") && s.contains("pt = 111"));
        // Janus's default, a thread per handle, is one omitted line.
        let mut c = config();
        c.event_loops = 0;
        assert!(!files(&c)[0].1.contains("event_loops"));
    }

    #[test]
    fn a_lib_dir_without_the_plugin_is_refused() {
        let e = find_lib_dir(Some(Path::new("/nonexistent"))).unwrap_err();
        assert!(e.contains("libjanus_streaming.so"), "{e}");
    }
}
