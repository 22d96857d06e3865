"""The toy world and the stand-ins the tests, the demo and the benchmarks are built on; nothing here is
part of FTI4CIR itself (src/ is).

- attributes.py: the named attributes of the shape and garment worlds, their seeded draws and edits;
- captions.py: every text of the world (caption pairs, modifications, CIRCO captions, web captions);
- drawing.py: a record of attributes drawn as an image; images saved;
- writers.py: the four benchmarks (ImageNet pairs, FashionIQ, CIRR, CIRCO) in their real layouts;
- world.py: make_toy_world, the whole world under one folder with its toy_manifest.json;
- web.py: the web part, captioned images the toy CLIP trains on;
- placeholders.py: small images at the real datasets' paths, for tests over the real annotation files;
- tiny_clip.py: a tiny randomly initialised CLIP in OpenAI's layout;
- clip_training.py: the toy CLIP's training (scripts/make_toy_clip.py is its command line);
- reference.py: the plain per-sample implementation that the tests and scripts/bench.py compare against.

scripts/ is on the path of every script here and of the tests, so these import as `toy.<module>`.
"""
