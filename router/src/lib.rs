//! Pure routing logic: functions of (swarm view, time, seed). No tokio, sockets, candle or clock.
