"""Make asv 0.6's published site (.asv/html) work offline.

asv 0.6's index.html loads jQuery, flot, bootstrap, stupidtable and md5 from
CDNs. Without them the page either redirects to error.html or renders without
bootstrap's CSS, so no ancestor of flot's legend has a background colour and
flot paints the legend box black (transparent -> alpha forced to 1).

This copies the same libraries, as vendored by asv 0.5.1's sdist
(unpack `pip download asv==0.5.1 --no-deps --no-binary :all:`; VENDOR_DIR is
its asv/www/vendor),
into HTML_DIR/vendor and points index.html's <script>/<link> tags at them.

usage: python tools/asv_localize.py [HTML_DIR [VENDOR_DIR]]   (default .asv/html)
"""

import re
import shutil
import sys
from pathlib import Path

VENDOR = Path(sys.argv[2] if len(sys.argv) > 2 else "asv-0.5.1/asv/www/vendor")
MAP = {
    "jquery-3.3.1.min.js": "jquery-3.3.1.min.js",
    "flot/0.8.3/jquery.flot.min.js": "jquery.flot-0.8.3.min.js",
    "jquery.flot.time.min.js": "jquery.flot-0.8.3.time.min.js",
    "jquery.flot.selection.min.js": "jquery.flot-0.8.3.selection.min.js",
    "jquery.flot.categories.min.js": "jquery.flot-0.8.3.categories.min.js",
    "jquery.flot.orderBars.js": "jquery.flot.orderBars.js",
    "stupidtable.min.js": "stupidtable.js",
    "md5.min.js": "md5.js",
    "bootstrap.min.js": "bootstrap-3.1.0.min.js",
    "bootstrap.min.css": "bootstrap-3.1.0.min.css",
}

html = Path(sys.argv[1] if len(sys.argv) > 1 else ".asv/html")
shutil.copytree(VENDOR, html / "vendor", dirs_exist_ok=True)
index = html / "index.html"
text = index.read_text()


def local(m):
    tag, url = m.group(0), m.group(2)
    for tail, name in MAP.items():
        if url.endswith(tail):
            tag = tag.replace(url, "vendor/" + name)
            # the SRI hashes are those of the CDN files
            return re.sub(r'\s+(integrity|crossorigin|referrerpolicy)="[^"]*"', "", tag)
    raise SystemExit(f"no local copy for {url}")


text = re.sub(r'<(?:script|link)[^>]*?\b(src|href)="(https?://[^"]+)"[^>]*>', local, text)
assert not re.search(r'<(?:script|link)[^>]*"https?://', text), "a CDN reference is left"
index.write_text(text)
print(f"{index}: CDN references replaced by {html / 'vendor'}")
