"""Sources, sinks, audio features and the live crowd-counting app.

Data flow of ``trt-exit count`` (see docs/pipelines.md)::

    uri ──▶ video_sources (capture thread, drop-oldest queue, reconnect)  ─┐
    uri ──▶ audio_sources (timestamped ring buffer: the window ending at   ├─▶ crowd_count
            the frame)                                                     │   (preprocess,
                                                                           │    executor, status)
    preprocess.image_to_input, audio_features.log_mel ─────────────────────┘        │
                                                              sinks (+ overlay) ◀───┘
"""
