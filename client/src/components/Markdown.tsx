import type { Nodes, Parent, PhrasingContent, Root } from 'mdast';
import ReactMarkdown, { type Components } from 'react-markdown';
import remarkGfm from 'remark-gfm';

// react-markdown builds React elements from the markdown syntax tree; nothing is ever set as
// HTML. Raw HTML in a reply (`<script>`, `<img onerror=…>`) is turned into plain text by
// `htmlAsText` below, so the reader sees exactly what the model wrote and nothing runs.
// react-markdown's default urlTransform drops `javascript:` and other unsafe link targets.
//
// Images are never loaded: `![alt](url)` in a reply would make every reader's browser fetch a
// URL the model (or whoever steered it) chose, telling that host who reads the chat and when.
// `imagesAsLinks` turns each image into an ordinary link labelled `[alt]`, fetched only if
// the reader clicks it (inside a link it becomes the text `[alt]`, links cannot nest). The
// server's Content-Security-Policy (`img-src 'self' data:`) would refuse a remote image anyway.

const FLOW_PARENTS = new Set(['root', 'blockquote', 'listItem', 'footnoteDefinition']);
const LINKS = new Set(['link', 'linkReference']);

function htmlToText(node: Nodes): void {
  if (!('children' in node)) return;
  const parent = node as Parent;
  parent.children = parent.children.map((child) => {
    if (child.type !== 'html') {
      htmlToText(child);
      return child;
    }
    const text = { type: 'text' as const, value: child.value };
    return FLOW_PARENTS.has(parent.type) ? { type: 'paragraph' as const, children: [text] } : text;
  }) as typeof parent.children;
}

/** A remark plugin: raw HTML nodes become text nodes. */
export function htmlAsText() {
  return (tree: Root) => {
    htmlToText(tree);
  };
}

const imageLink = { hProperties: { className: ['image-link'] } };

function imageReplacement(image: Nodes, inLink: boolean): PhrasingContent | null {
  if (image.type !== 'image' && image.type !== 'imageReference') return null;
  const label = { type: 'text' as const, value: `[${image.alt?.trim() || 'image'}]` };
  if (inLink) return label;
  if (image.type === 'imageReference') {
    const { identifier, label: refLabel, referenceType } = image;
    return { type: 'linkReference', identifier, label: refLabel, referenceType, children: [label], data: imageLink };
  }
  const title = image.title ?? `Image, not loaded: ${image.url}`;
  return { type: 'link', url: image.url, title, children: [label], data: imageLink };
}

function imagesToLinks(node: Nodes, inLink: boolean): void {
  if (!('children' in node)) return;
  const parent = node as Parent;
  const nested = inLink || LINKS.has(parent.type);
  parent.children = parent.children.map((child) => {
    const replacement = imageReplacement(child, nested);
    if (replacement) return replacement;
    imagesToLinks(child, nested);
    return child;
  }) as typeof parent.children;
}

/** A remark plugin: images become links to them (or text inside a link), never `<img>`. */
export function imagesAsLinks() {
  return (tree: Root) => {
    imagesToLinks(tree, false);
  };
}

const components: Components = {
  a: ({ node: _node, ...props }) => <a {...props} target="_blank" rel="noopener noreferrer" />,
  // Belt and braces: should any image reach the renderer, it is shown as its alt text.
  img: ({ alt }) => <span className="image-link">[{alt?.trim() || 'image'}]</span>,
};

export function Markdown({ text }: { text: string }) {
  return (
    <ReactMarkdown remarkPlugins={[remarkGfm, htmlAsText, imagesAsLinks]} components={components}>
      {text}
    </ReactMarkdown>
  );
}
