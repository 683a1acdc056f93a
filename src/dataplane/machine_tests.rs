//! Lifecycle tests of the connection machine, without a socket or a clock.

use super::*;

const CANCELED: i32 = -libc::ECANCELED;

fn actions(m: &mut Machine) -> Vec<Action> {
    std::iter::from_fn(|| m.poll_action()).collect()
}

/// A machine that connected at once and asked to pump both ways.
fn relaying(now: Instant) -> Machine {
    let mut m = Machine::new(now, 4);
    assert_eq!(actions(&mut m), [Action::Dial]);
    m.dialed(Dialed::Connected);
    assert_eq!(actions(&mut m), [Action::Connected, Action::Pump(Dir::Up), Action::Pump(Dir::Down)]);
    m
}

/// Both directions wait for their source: two readable polls in flight.
fn idle_relaying(now: Instant) -> Machine {
    let mut m = relaying(now);
    m.pumped(Dir::Up, 0, Pumped::Wait(Wait::SourceReadable));
    m.pumped(Dir::Down, 0, Pumped::Wait(Wait::SourceReadable));
    assert_eq!(
        actions(&mut m),
        [Action::ArmPoll(Op::Readable(Dir::Up)), Action::ArmPoll(Op::Readable(Dir::Down))]
    );
    m
}

#[test]
fn retries_next_candidate_with_that_attempts_timeout_after_a_timeout() {
    let mut m = Machine::new(Instant::now(), 2);
    assert_eq!(actions(&mut m), [Action::Dial]);
    m.dialed(Dialed::InProgress { attempt: 0 });
    assert_eq!(actions(&mut m), [Action::ArmConnect { timeout: 0 }]);
    // The linked timeout fires: its completion, then the poll's, cancelled.
    m.completed(Op::ConnectTimeout, -libc::ETIME);
    assert!(actions(&mut m).is_empty());
    m.completed(Op::Connect, CANCELED);
    assert_eq!(actions(&mut m), [Action::CheckConnect { timed_out: true }]);
    m.connect_checked(false);
    assert_eq!(actions(&mut m), [Action::Dial]);
    m.dialed(Dialed::InProgress { attempt: 1 });
    assert_eq!(actions(&mut m), [Action::ArmConnect { timeout: 1 }]);
    m.completed(Op::Connect, CANCELED);
    m.connect_checked(false);
    m.dialed(Dialed::InProgress { attempt: 2 });
    assert_eq!(
        actions(&mut m),
        [Action::CheckConnect { timed_out: true }, Action::Dial, Action::ArmConnect { timeout: 1 }],
        "attempts past the list repeat its last timeout"
    );
    // This attempt connects; its timeout is cancelled by the kernel.
    m.completed(Op::Connect, libc::POLLOUT as i32);
    assert_eq!(actions(&mut m), [Action::CheckConnect { timed_out: false }]);
    m.connect_checked(true);
    assert_eq!(m.phase(), Phase::Relaying);
    assert_eq!(actions(&mut m), [Action::Connected, Action::Pump(Dir::Up), Action::Pump(Dir::Down)]);
    assert!(m.in_flight(), "the linked timeouts of two attempts are still completing");
    m.completed(Op::ConnectTimeout, CANCELED);
    m.completed(Op::ConnectTimeout, CANCELED);
    assert!(!m.in_flight());
    assert_eq!(m.phase(), Phase::Relaying);
}

#[test]
fn refusal_after_a_partial_failure_resets_and_frees_only_after_the_last_timeout() {
    let mut m = Machine::new(Instant::now(), 4);
    actions(&mut m);
    // First candidate: the connect poll reports refused before its timeout.
    m.dialed(Dialed::InProgress { attempt: 0 });
    m.completed(Op::Connect, libc::POLLERR as i32);
    assert_eq!(
        actions(&mut m),
        [Action::ArmConnect { timeout: 0 }, Action::CheckConnect { timed_out: false }]
    );
    m.connect_checked(false);
    assert_eq!(actions(&mut m), [Action::Dial]);
    // No candidate is left: the client is refused with a reset.
    m.dialed(Dialed::Exhausted);
    assert_eq!(m.phase(), Phase::Closing);
    assert_eq!(
        actions(&mut m),
        [Action::Close { reset: true }],
        "nothing to cancel, but the first attempt's timeout is still in flight"
    );
    m.completed(Op::ConnectTimeout, CANCELED);
    assert_eq!(actions(&mut m), [Action::Free]);
    assert_eq!(m.phase(), Phase::Freed);
}

#[test]
fn refusal_with_no_candidate_frees_at_once() {
    let mut m = Machine::new(Instant::now(), 4);
    actions(&mut m);
    m.dialed(Dialed::Exhausted);
    assert_eq!(actions(&mut m), [Action::Close { reset: true }, Action::Free]);
}

fn half_close(first: Dir, second: Dir) {
    let mut m = idle_relaying(Instant::now());
    m.completed(Op::Readable(first), libc::POLLIN as i32);
    assert_eq!(actions(&mut m), [Action::Pump(first)]);
    m.pumped(first, 10, Pumped::Wait(Wait::Finished));
    assert!(actions(&mut m).is_empty(), "one direction finished: the other still relays");
    assert_eq!(m.phase(), Phase::Relaying);
    m.completed(Op::Readable(second), libc::POLLIN as i32);
    assert_eq!(actions(&mut m), [Action::Pump(second)]);
    m.pumped(second, 5, Pumped::Wait(Wait::SinkWritable));
    assert_eq!(actions(&mut m), [Action::ArmPoll(Op::Writable(second))]);
    m.completed(Op::Writable(second), libc::POLLOUT as i32);
    assert_eq!(actions(&mut m), [Action::Pump(second)]);
    m.pumped(second, 5, Pumped::Wait(Wait::Finished));
    assert_eq!(
        actions(&mut m),
        [Action::Close { reset: false }, Action::Free],
        "FIN both ways: a clean close"
    );
}

#[test]
fn half_close_client_first_then_endpoint_closes_cleanly() {
    half_close(Dir::Up, Dir::Down);
}

#[test]
fn half_close_endpoint_first_then_client_closes_cleanly() {
    half_close(Dir::Down, Dir::Up);
}

fn reset_from(dir: Dir) {
    let other = if dir == Dir::Up { Dir::Down } else { Dir::Up };
    let mut m = idle_relaying(Instant::now());
    m.completed(Op::Readable(dir), libc::POLLIN as i32);
    assert_eq!(actions(&mut m), [Action::Pump(dir)]);
    m.pumped(dir, 0, Pumped::Failed);
    assert_eq!(
        actions(&mut m),
        [Action::Close { reset: true }, Action::Cancel(Op::Readable(other))],
        "a failure resets both sides and cancels the other direction's poll"
    );
    assert_eq!(m.phase(), Phase::Closing);
    m.completed(Op::Readable(other), CANCELED);
    assert_eq!(actions(&mut m), [Action::Free]);
}

#[test]
fn reset_by_client_resets_both_sides() {
    reset_from(Dir::Up);
}

#[test]
fn reset_by_endpoint_resets_both_sides() {
    reset_from(Dir::Down);
}

#[test]
fn reset_after_one_direction_finished_is_still_a_reset() {
    let mut m = relaying(Instant::now());
    m.pumped(Dir::Up, 3, Pumped::Wait(Wait::Finished));
    m.pumped(Dir::Down, 0, Pumped::Failed);
    assert_eq!(actions(&mut m), [Action::Close { reset: true }, Action::Free]);
}

#[test]
fn a_cancel_must_complete_before_the_slot_is_freed() {
    let mut m = idle_relaying(Instant::now());
    m.reset();
    assert_eq!(
        actions(&mut m),
        [
            Action::Close { reset: true },
            Action::Cancel(Op::Readable(Dir::Up)),
            Action::Cancel(Op::Readable(Dir::Down)),
        ]
    );
    m.completed(Op::Readable(Dir::Down), CANCELED);
    assert!(actions(&mut m).is_empty(), "one poll still in flight: the slot stays taken");
    // A poll that raced its cancel and completed with readiness: no pump.
    m.completed(Op::Readable(Dir::Up), libc::POLLIN as i32);
    assert_eq!(actions(&mut m), [Action::Free]);
    // Anything later changes nothing, and Free is never issued twice.
    m.completed(Op::Readable(Dir::Up), CANCELED);
    m.reset();
    assert!(actions(&mut m).is_empty());
    assert_eq!(m.phase(), Phase::Freed);
}

#[test]
fn a_cancel_while_connecting_waits_for_the_poll_and_its_timeout() {
    let mut m = Machine::new(Instant::now(), 1);
    actions(&mut m);
    m.dialed(Dialed::InProgress { attempt: 0 });
    actions(&mut m);
    m.reset();
    assert_eq!(actions(&mut m), [Action::Close { reset: true }, Action::Cancel(Op::Connect)]);
    m.completed(Op::Connect, CANCELED);
    assert!(actions(&mut m).is_empty(), "no connect check once closing; the timeout is in flight");
    m.completed(Op::ConnectTimeout, CANCELED);
    assert_eq!(actions(&mut m), [Action::Free]);
}

#[test]
fn a_poll_asked_for_but_not_submitted_does_not_hold_the_slot() {
    let mut m = relaying(Instant::now());
    // Up asks for a poll; before the worker submits it, Down fails.
    m.pumped(Dir::Up, 0, Pumped::Wait(Wait::SourceReadable));
    m.pumped(Dir::Down, 0, Pumped::Failed);
    assert_eq!(actions(&mut m), [Action::Close { reset: true }, Action::Free]);
}

#[test]
fn a_drain_that_expires_resets_open_connections() {
    let now = Instant::now();
    // One connection finishes within the drain: it closes with FIN.
    let mut done = relaying(now);
    done.pumped(Dir::Up, 1, Pumped::Wait(Wait::Finished));
    done.pumped(Dir::Down, 1, Pumped::Wait(Wait::Finished));
    assert_eq!(actions(&mut done), [Action::Close { reset: false }, Action::Free]);
    // One is mid-transfer, waiting on a slow sink, when the drain expires.
    let mut slow = relaying(now);
    slow.pumped(Dir::Up, 0, Pumped::Wait(Wait::SourceReadable));
    slow.pumped(Dir::Down, 65536, Pumped::Wait(Wait::SinkWritable));
    actions(&mut slow);
    slow.reset();
    assert_eq!(
        actions(&mut slow),
        [
            Action::Close { reset: true },
            Action::Cancel(Op::Readable(Dir::Up)),
            Action::Cancel(Op::Writable(Dir::Down)),
        ],
        "a cut-off transfer must never look complete: RST, not FIN"
    );
}

#[test]
fn an_idle_connection_is_reset_after_the_limit_and_traffic_defers_it() {
    let t0 = Instant::now();
    let limit = Some(Duration::from_secs(10));
    let mut m = idle_relaying(t0);
    assert!(!m.tick(t0 + Duration::from_secs(5), limit));
    m.completed(Op::Readable(Dir::Up), libc::POLLIN as i32);
    m.pumped(Dir::Up, 100, Pumped::Wait(Wait::SourceReadable));
    actions(&mut m);
    assert!(!m.tick(t0 + Duration::from_secs(9), limit), "bytes moved: the idle clock restarts");
    assert!(!m.tick(t0 + Duration::from_secs(18), limit));
    assert!(!m.tick(t0 + Duration::from_secs(18), None), "no limit: never");
    assert!(m.tick(t0 + Duration::from_secs(19), limit));
    assert_eq!(actions(&mut m)[0], Action::Close { reset: true });
}

#[test]
fn a_yielded_direction_is_pumped_again_and_a_second_poll_is_never_armed() {
    let mut m = relaying(Instant::now());
    m.pumped(Dir::Up, 1 << 20, Pumped::Wait(Wait::Yield));
    assert_eq!(actions(&mut m), [Action::PumpLater(Dir::Up)]);
    m.resume(Dir::Up);
    assert_eq!(actions(&mut m), [Action::Pump(Dir::Up)]);
    m.pumped(Dir::Up, 0, Pumped::Wait(Wait::SinkWritable));
    m.pumped(Dir::Up, 0, Pumped::Wait(Wait::SinkWritable));
    assert_eq!(actions(&mut m), [Action::ArmPoll(Op::Writable(Dir::Up))]);
}

#[test]
fn the_largest_close_fits_the_action_queue() {
    let mut m = relaying(Instant::now());
    for dir in [Dir::Up, Dir::Down] {
        m.pumped(dir, 0, Pumped::Wait(Wait::SourceReadable));
        m.pumped(dir, 0, Pumped::Wait(Wait::SinkWritable));
    }
    assert_eq!(actions(&mut m).len(), 4, "four polls armed");
    m.reset();
    let close = actions(&mut m);
    assert_eq!(close.len(), 5, "close and four cancels: {close:?}");
    for op in [Op::Readable(Dir::Up), Op::Writable(Dir::Up), Op::Readable(Dir::Down), Op::Writable(Dir::Down)]
    {
        m.completed(op, CANCELED);
    }
    assert_eq!(actions(&mut m), [Action::Free]);
}

#[test]
fn a_machine_is_small_and_holds_no_heap_memory() {
    // Idle connections must stay cheap: the machine lives inline in the
    // connection, with its action queue.
    assert!(std::mem::size_of::<Machine>() <= 64, "{} bytes", std::mem::size_of::<Machine>());
}

// ---- PROXY protocol steps ---------------------------------------------------

fn accepting(now: Instant, send: bool) -> Machine {
    Machine::with_preambles(now, 4, Preambles { accept: true, send })
}

#[test]
fn an_accepted_header_is_read_before_any_endpoint_is_dialed() {
    let now = Instant::now();
    let mut m = accepting(now, false);
    assert_eq!(m.phase(), Phase::Header);
    assert_eq!(actions(&mut m), [Action::ReadHeader], "read at once: the header may be there already");
    m.header_read(HeaderRead::More);
    assert_eq!(actions(&mut m), [Action::ArmPoll(Op::Readable(Dir::Up))]);
    m.completed(Op::Readable(Dir::Up), libc::POLLIN as i32);
    assert_eq!(actions(&mut m), [Action::ReadHeader]);
    m.header_read(HeaderRead::Done);
    assert_eq!(m.phase(), Phase::Connecting);
    assert_eq!(actions(&mut m), [Action::Dial]);
    m.dialed(Dialed::Connected);
    assert_eq!(actions(&mut m), [Action::Connected, Action::Pump(Dir::Up), Action::Pump(Dir::Down)]);
}

#[test]
fn a_refused_header_resets_the_client_without_dialing() {
    let mut m = accepting(Instant::now(), true);
    actions(&mut m);
    m.header_read(HeaderRead::Refused);
    assert_eq!(actions(&mut m), [Action::Close { reset: true }, Action::Free]);
}

#[test]
fn a_client_late_with_its_header_is_reset_on_the_tick_after_the_deadline() {
    let now = Instant::now();
    let mut m = accepting(now, false);
    actions(&mut m);
    m.header_read(HeaderRead::More);
    actions(&mut m);
    assert!(!m.tick(now + HEADER_WAIT - Duration::from_millis(1), None), "not late yet");
    assert!(m.tick(now + HEADER_WAIT, None));
    assert_eq!(actions(&mut m), [Action::Close { reset: true }, Action::Cancel(Op::Readable(Dir::Up))]);
    m.completed(Op::Readable(Dir::Up), CANCELED);
    assert_eq!(actions(&mut m), [Action::Free]);
}

#[test]
fn each_connected_endpoint_gets_the_header_before_relaying_and_a_failed_one_is_skipped() {
    let mut m = Machine::with_preambles(Instant::now(), 4, Preambles { accept: false, send: true });
    assert_eq!(actions(&mut m), [Action::Dial]);
    m.dialed(Dialed::Connected);
    assert_eq!(m.phase(), Phase::Preamble);
    assert_eq!(actions(&mut m), [Action::SendPreamble], "no pump before the header is out");
    // The first endpoint resets before taking it: the next one is dialed.
    m.preamble_sent(PreambleSent::Failed);
    assert_eq!(actions(&mut m), [Action::Dial]);
    m.dialed(Dialed::InProgress { attempt: 1 });
    m.completed(Op::Connect, libc::POLLOUT as i32);
    m.completed(Op::ConnectTimeout, CANCELED);
    assert_eq!(
        actions(&mut m),
        [Action::ArmConnect { timeout: 1 }, Action::CheckConnect { timed_out: false }]
    );
    m.connect_checked(true);
    assert_eq!(actions(&mut m), [Action::SendPreamble], "the retried endpoint gets its own header");
    m.preamble_sent(PreambleSent::Partial);
    assert_eq!(actions(&mut m), [Action::ArmPoll(Op::Writable(Dir::Up))]);
    m.completed(Op::Writable(Dir::Up), libc::POLLOUT as i32);
    assert_eq!(actions(&mut m), [Action::SendPreamble]);
    m.preamble_sent(PreambleSent::All);
    assert_eq!(m.phase(), Phase::Relaying);
    assert_eq!(actions(&mut m), [Action::Connected, Action::Pump(Dir::Up), Action::Pump(Dir::Down)]);
    assert!(!m.in_flight());
}

#[test]
fn a_reset_while_sending_the_header_cancels_its_poll_and_frees_after_it() {
    let mut m = Machine::with_preambles(Instant::now(), 4, Preambles { accept: false, send: true });
    actions(&mut m);
    m.dialed(Dialed::Connected);
    actions(&mut m);
    m.preamble_sent(PreambleSent::Partial);
    actions(&mut m);
    m.reset();
    assert_eq!(actions(&mut m), [Action::Close { reset: true }, Action::Cancel(Op::Writable(Dir::Up))]);
    m.completed(Op::Writable(Dir::Up), CANCELED);
    assert_eq!(actions(&mut m), [Action::Free]);
}

/// Both directions on the ring: a multishot receive in flight each way.
fn ring_relaying(now: Instant) -> Machine {
    let mut m = relaying(now);
    m.pumped(Dir::Up, 0, Pumped::Wait(Wait::Ring { recv: true, send: false }));
    m.pumped(Dir::Down, 0, Pumped::Wait(Wait::Ring { recv: true, send: false }));
    assert_eq!(actions(&mut m), [Action::Start(Op::Recv(Dir::Up)), Action::Start(Op::Recv(Dir::Down))]);
    m
}

#[test]
fn a_multishot_receive_stays_in_flight_until_a_completion_without_more() {
    let mut m = ring_relaying(Instant::now());
    m.completed_more(Op::Recv(Dir::Up), 64, true);
    assert_eq!(actions(&mut m), [Action::Pump(Dir::Up)]);
    assert!(m.is_armed(Op::Recv(Dir::Up)), "MORE: the receive goes on");
    // Bytes held and the receive still armed: send them, arm nothing new.
    m.pumped(Dir::Up, 0, Pumped::Wait(Wait::Ring { recv: true, send: true }));
    assert_eq!(actions(&mut m), [Action::Start(Op::Send(Dir::Up))]);
    m.completed(Op::Send(Dir::Up), 64);
    assert_eq!(actions(&mut m), [Action::Pump(Dir::Up)]);
    m.pumped(Dir::Up, 64, Pumped::Wait(Wait::Ring { recv: true, send: false }));
    assert!(actions(&mut m).is_empty(), "one receive per direction, never two");
    // The multishot ends (no MORE, say after an overflow): re-armed once
    // its last bytes are taken.
    m.completed_more(Op::Recv(Dir::Up), 10, false);
    assert!(!m.is_armed(Op::Recv(Dir::Up)));
    assert_eq!(actions(&mut m), [Action::Pump(Dir::Up)]);
    m.pumped(Dir::Up, 0, Pumped::Wait(Wait::Ring { recv: true, send: true }));
    assert_eq!(actions(&mut m), [Action::Start(Op::Send(Dir::Up)), Action::Start(Op::Recv(Dir::Up))]);
}

#[test]
fn a_full_direction_cancels_its_receive_once_and_rearms_after_the_last_completion() {
    let mut m = ring_relaying(Instant::now());
    m.completed_more(Op::Recv(Dir::Down), 16384, true);
    actions(&mut m);
    m.pumped(Dir::Down, 0, Pumped::Wait(Wait::Ring { recv: false, send: true }));
    assert_eq!(actions(&mut m), [Action::Start(Op::Send(Dir::Down)), Action::Cancel(Op::Recv(Dir::Down))]);
    // A late completion of the receive before the cancel lands.
    m.completed_more(Op::Recv(Dir::Down), 16384, true);
    actions(&mut m);
    m.pumped(Dir::Down, 0, Pumped::Wait(Wait::Ring { recv: false, send: true }));
    assert!(actions(&mut m).is_empty(), "cancelled once; the send is in flight");
    m.completed_more(Op::Recv(Dir::Down), CANCELED, false);
    actions(&mut m);
    m.pumped(Dir::Down, 0, Pumped::Wait(Wait::Ring { recv: true, send: true }));
    assert_eq!(actions(&mut m), [Action::Start(Op::Recv(Dir::Down))], "the send was still in flight");
}

#[test]
fn a_ring_connection_is_freed_only_after_its_receives_and_send_are_in() {
    let mut m = ring_relaying(Instant::now());
    m.completed_more(Op::Recv(Dir::Up), 100, true);
    actions(&mut m);
    m.pumped(Dir::Up, 0, Pumped::Wait(Wait::Ring { recv: true, send: true }));
    actions(&mut m);
    m.reset();
    assert_eq!(
        actions(&mut m),
        [
            Action::Close { reset: true },
            Action::Cancel(Op::Recv(Dir::Up)),
            Action::Cancel(Op::Recv(Dir::Down)),
            Action::Cancel(Op::Send(Dir::Up)),
        ]
    );
    m.completed_more(Op::Recv(Dir::Up), 50, true);
    m.completed_more(Op::Recv(Dir::Up), CANCELED, false);
    m.completed(Op::Recv(Dir::Down), CANCELED);
    assert!(actions(&mut m).is_empty(), "the send is still reading its buffer");
    m.completed(Op::Send(Dir::Up), CANCELED);
    assert_eq!(actions(&mut m), [Action::Free]);
}

#[test]
fn a_ring_direction_forwards_end_of_file_and_closes_with_fin() {
    let mut m = ring_relaying(Instant::now());
    m.completed_more(Op::Recv(Dir::Up), 0, false);
    assert_eq!(actions(&mut m), [Action::Pump(Dir::Up)]);
    m.pumped(Dir::Up, 0, Pumped::Wait(Wait::Finished));
    m.completed_more(Op::Recv(Dir::Down), 0, false);
    assert_eq!(actions(&mut m), [Action::Pump(Dir::Down)]);
    m.pumped(Dir::Down, 0, Pumped::Wait(Wait::Finished));
    assert_eq!(actions(&mut m), [Action::Close { reset: false }, Action::Free]);
}

#[test]
fn an_endpoint_that_takes_no_byte_of_its_header_is_reset_after_the_idle_limit() {
    let t0 = Instant::now();
    let limit = Some(Duration::from_secs(10));
    let mut m = Machine::with_preambles(t0, 4, Preambles { accept: false, send: true });
    actions(&mut m);
    m.dialed(Dialed::Connected);
    actions(&mut m);
    m.preamble_sent(PreambleSent::Partial);
    assert_eq!(actions(&mut m), [Action::ArmPoll(Op::Writable(Dir::Up))]);
    assert!(!m.tick(t0 + Duration::from_secs(9), limit));
    assert!(m.tick(t0 + Duration::from_secs(10), limit), "a stalled header send has a deadline");
    assert_eq!(actions(&mut m), [Action::Close { reset: true }, Action::Cancel(Op::Writable(Dir::Up))]);
    m.completed(Op::Writable(Dir::Up), CANCELED);
    assert_eq!(actions(&mut m), [Action::Free]);
}
