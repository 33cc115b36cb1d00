//! Join a voice channel and play: a 440 Hz tone through a PCM pipe (paused for half a second in the
//! middle), then the same tone at 50 % volume, then a file or URL when one is given.
//!
//!     cargo run --example play -- ENDPOINT TOKEN CA_FILE|"" USER GUILD CHANNEL SESSION [FILE_OR_URL]
//!
//! (with TELECOM_LIB_DIR set; try it against `telecom emulate --no-dave`).

use std::env;
use std::f64::consts::PI;
use std::path::Path;
use std::process::ExitCode;
use std::thread::sleep;
use std::time::Duration;

use telecom::{Client, ErrorKind, Playable};

/// s16le stereo sine at -6 dBFS peak.
fn tone(seconds: f64, freq: f64) -> Vec<u8> {
    let frames = (seconds * 48000.0) as usize;
    let mut pcm = Vec::with_capacity(frames * 4);
    for i in 0..frames {
        let v = (32767.0 * 0.501_187_233_6 * (2.0 * PI * freq * i as f64 / 48000.0).sin()).round() as i16;
        pcm.extend_from_slice(&v.to_le_bytes());
        pcm.extend_from_slice(&v.to_le_bytes());
    }
    pcm
}

fn run(args: &[String]) -> telecom::Result<()> {
    let (endpoint, token, ca) = (&args[1], &args[2], &args[3]);
    let parse = |s: &String| s.parse::<u64>().expect("ids are numbers");
    let (user, guild, channel) = (parse(&args[4]), parse(&args[5]), parse(&args[6]));
    let session = &args[7];

    println!("telecom {}", telecom::version()?);
    let client = Client::new(user, guild, session, Some(channel))?;
    let ca_path = if ca.is_empty() { None } else { Some(Path::new(ca.as_str())) };
    client.set_server_info(Some(endpoint), token, ca_path)?;
    client.wait_ready(Duration::from_secs(10))?;
    println!("ready");

    let pipe = Playable::pcm_pipe()?;
    client.play(&pipe)?;
    pipe.send_wait(&tone(1.5, 440.0), Some(Duration::from_secs(5)))?;
    pipe.close_input()?;
    sleep(Duration::from_millis(500));
    pipe.pause()?;
    sleep(Duration::from_millis(500));
    pipe.resume()?;
    pipe.wait_done(Some(Duration::from_secs(8)))?;
    drop(pipe);

    client.set_volume(50.0)?;
    let second = Playable::pcm_pipe()?;
    client.play(&second)?;
    second.send(&tone(1.0, 440.0))?;
    second.close_input()?;
    second.wait_done(Some(Duration::from_secs(8)))?;
    client.set_volume(100.0)?;
    println!("tones done");

    if let Some(source) = args.get(8) {
        match Playable::from_url(source) {
            Ok(track) => {
                client.play(&track)?;
                track.wait_done(Some(Duration::from_secs(20)))?;
                println!("file played");
            }
            Err(e) if e.kind == ErrorKind::Unsupported => println!("file unsupported: {e}"),
            Err(e) => return Err(e),
        }
    }

    let err = client.set_volume(500.0).unwrap_err();
    println!("error {} {}", err.status_name(), err.message);
    while let Some(event) = client.poll_event()? {
        println!("event {} {}", event.name, event.json);
    }
    println!("stats {}", client.stats_json()?);
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = env::args().collect();
    if args.len() < 8 {
        eprintln!("usage: play ENDPOINT TOKEN CA_FILE|\"\" USER GUILD CHANNEL SESSION [FILE_OR_URL]");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(()) => {
            println!("done");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("failed: {e}");
            ExitCode::from(4)
        }
    }
}
