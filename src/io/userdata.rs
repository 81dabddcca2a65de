//! The `user_data` word carried by every submission and echoed by its completion.
//!
//! Owns only the bit layout: which operation a completion belongs to and, for socket
//! operations, which slot, slot generation, socket (side) and upstream epoch it was issued for.
//! It must not look at connections or the ring; the worker decides what a decoded token means.
//!
//! Layout (most significant bit first):
//!
//! ```text
//! | slot: 24 | generation: 16 | epoch: 15 | side: 1 | op: 8 |
//! ```
//!
//! Control operations (accept, eventfd wake-up, their cancels) use an op code below
//! [`Op::Recv`] with every other field zero, so they can never collide with a socket token.
//! `0` is never issued, which makes a zeroed `user_data` stand out as a bug.

use crate::relay::Side;

const OP_BITS: u32 = 8;
const SIDE_SHIFT: u32 = OP_BITS;
const EPOCH_SHIFT: u32 = SIDE_SHIFT + 1;
const EPOCH_BITS: u32 = 15;
const GEN_SHIFT: u32 = EPOCH_SHIFT + EPOCH_BITS;
const SLOT_SHIFT: u32 = GEN_SHIFT + 16;

/// Largest slab index a token can carry (24 bits); the worker refuses connections beyond it.
pub(crate) const MAX_SLOT: usize = (1 << (64 - SLOT_SHIFT)) - 1;
/// Upstream epochs wrap within 15 bits; a collision needs 32768 reconnects of one session while
/// an old socket still has operations in flight.
pub(crate) const EPOCH_MASK: u16 = (1 << EPOCH_BITS) - 1;

/// The operation a completion answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Op {
    /// The worker's accept on the shared listener.
    Accept = 1,
    /// The read kept armed on the worker's eventfd.
    Wake = 2,
    /// A cancel aimed at a control operation (accept or wake); its result is ignored.
    ControlCancel = 3,
    /// Multishot receive on a session socket.
    Recv = 16,
    /// Send on a session socket.
    Send = 17,
    /// Connect of an upstream socket.
    Connect = 18,
    /// A cancel aimed at one socket's operations; it holds the fd, so it counts as in flight.
    Cancel = 19,
}

impl Op {
    fn from_bits(bits: u8) -> Option<Op> {
        Some(match bits {
            1 => Op::Accept,
            2 => Op::Wake,
            3 => Op::ControlCancel,
            16 => Op::Recv,
            17 => Op::Send,
            18 => Op::Connect,
            19 => Op::Cancel,
            _ => return None,
        })
    }
}

/// `user_data` of the accept.
pub(crate) const ACCEPT: u64 = Op::Accept as u64;
/// `user_data` of the eventfd read.
pub(crate) const WAKE: u64 = Op::Wake as u64;
/// `user_data` of cancels of the accept or the eventfd read.
pub(crate) const CONTROL_CANCEL: u64 = Op::ControlCancel as u64;

/// Identity of one session slot at one point of its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotId {
    /// Index in the worker's slab.
    pub slot: u32,
    /// Bumped each time the slot is freed, so completions for an earlier tenant are told apart.
    pub gen: u16,
}

/// A decoded socket-operation token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token {
    pub id: SlotId,
    pub side: Side,
    /// Always 0 for the client socket; counts upstream sockets of one session.
    pub epoch: u16,
    pub op: Op,
}

impl Token {
    /// Packs the token into a `user_data` word.
    pub(crate) fn encode(self) -> u64 {
        let side = match self.side {
            Side::Client => 0u64,
            Side::Upstream => 1u64,
        };
        (u64::from(self.id.slot) << SLOT_SHIFT)
            | (u64::from(self.id.gen) << GEN_SHIFT)
            | (u64::from(self.epoch & EPOCH_MASK) << EPOCH_SHIFT)
            | (side << SIDE_SHIFT)
            | self.op as u64
    }
}

/// What a completion's `user_data` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decoded {
    Accept,
    Wake,
    ControlCancel,
    Sock(Token),
    /// Not a value this worker issues; dropped.
    Unknown,
}

/// Unpacks a `user_data` word.
pub(crate) fn decode(user_data: u64) -> Decoded {
    let Some(op) = Op::from_bits(user_data as u8) else {
        return Decoded::Unknown;
    };
    match op {
        Op::Accept | Op::Wake | Op::ControlCancel if user_data >> OP_BITS != 0 => Decoded::Unknown,
        Op::Accept => Decoded::Accept,
        Op::Wake => Decoded::Wake,
        Op::ControlCancel => Decoded::ControlCancel,
        Op::Recv | Op::Send | Op::Connect | Op::Cancel => Decoded::Sock(Token {
            id: SlotId {
                slot: (user_data >> SLOT_SHIFT) as u32,
                gen: (user_data >> GEN_SHIFT) as u16,
            },
            side: if (user_data >> SIDE_SHIFT) & 1 == 0 {
                Side::Client
            } else {
                Side::Upstream
            },
            epoch: (user_data >> EPOCH_SHIFT) as u16 & EPOCH_MASK,
            op,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_extremes() {
        for (slot, gen, epoch) in [
            (0, 0, 0),
            (MAX_SLOT as u32, u16::MAX, EPOCH_MASK),
            (7, 1, 3),
        ] {
            for side in [Side::Client, Side::Upstream] {
                for op in [Op::Recv, Op::Send, Op::Connect, Op::Cancel] {
                    let t = Token {
                        id: SlotId { slot, gen },
                        side,
                        epoch,
                        op,
                    };
                    assert_eq!(decode(t.encode()), Decoded::Sock(t));
                }
            }
        }
    }

    #[test]
    fn sentinels_are_distinct_from_socket_tokens() {
        assert_eq!(decode(ACCEPT), Decoded::Accept);
        assert_eq!(decode(WAKE), Decoded::Wake);
        assert_eq!(decode(CONTROL_CANCEL), Decoded::ControlCancel);
        assert_eq!(decode(0), Decoded::Unknown);
        assert_eq!(decode(ACCEPT | 1 << 40), Decoded::Unknown);
    }
}
