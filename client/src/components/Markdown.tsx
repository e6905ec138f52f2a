import type { Nodes, Parent, Root } from 'mdast';
import ReactMarkdown, { type Components } from 'react-markdown';
import remarkGfm from 'remark-gfm';

// react-markdown builds React elements from the markdown syntax tree; nothing is ever set as
// HTML. Raw HTML in a reply (`<script>`, `<img onerror=…>`) is turned into plain text by
// `htmlAsText` below, so the reader sees exactly what the model wrote and nothing runs.
// react-markdown's default urlTransform drops `javascript:` and other unsafe link targets.

const FLOW_PARENTS = new Set(['root', 'blockquote', 'listItem', 'footnoteDefinition']);

function convert(node: Nodes): void {
  if (!('children' in node)) return;
  const parent = node as Parent;
  parent.children = parent.children.map((child) => {
    if (child.type !== 'html') {
      convert(child);
      return child;
    }
    const text = { type: 'text' as const, value: child.value };
    return FLOW_PARENTS.has(parent.type) ? { type: 'paragraph' as const, children: [text] } : text;
  }) as typeof parent.children;
}

/** A remark plugin: raw HTML nodes become text nodes. */
export function htmlAsText() {
  return (tree: Root) => {
    convert(tree);
  };
}

const components: Components = {
  a: ({ node: _node, ...props }) => <a {...props} target="_blank" rel="noopener noreferrer" />,
};

export function Markdown({ text }: { text: string }) {
  return (
    <ReactMarkdown remarkPlugins={[remarkGfm, htmlAsText]} components={components}>
      {text}
    </ReactMarkdown>
  );
}
