import { render } from '@testing-library/react';
import { describe, expect, it } from 'vitest';
import { Markdown } from './Markdown';

const shown = (text: string) => render(<Markdown text={text} />).container;

describe('images in a reply are never loaded', () => {
  it('renders an inline image as a link labelled with its alt text', () => {
    const root = shown('Look: ![a cat](http://tracker.example/cat.png?who=ann) here');
    expect(root.querySelector('img')).toBeNull();
    const link = root.querySelector('a.image-link');
    expect(link).toHaveTextContent('[a cat]');
    expect(link).toHaveAttribute('href', 'http://tracker.example/cat.png?who=ann');
    expect(link).toHaveAttribute('rel', 'noopener noreferrer');
    expect(root).toHaveTextContent('Look: [a cat] here');
  });

  it('covers reference images, images inside links and images without alt text', () => {
    const root = shown(
      '![ref][pic]\n\n[![inner](https://x.example/i.png)](https://x.example/)\n\n![](https://x.example/n.png)\n\n[pic]: https://x.example/r.png',
    );
    expect(root.querySelector('img')).toBeNull();
    const labels = [...root.querySelectorAll('.image-link')].map((el) => el.textContent);
    expect(labels).toEqual(['[ref]', '[image]']);
    expect(root.querySelector('a.image-link')).toHaveAttribute('href', 'https://x.example/r.png');
    // Inside a link the image is the link's text (links do not nest).
    const outer = [...root.querySelectorAll('a')].find((a) => a.textContent === '[inner]');
    expect(outer).toHaveAttribute('href', 'https://x.example/');
    expect(root.querySelector('a a')).toBeNull();
  });

  it('drops an unsafe image URL and keeps the alt text', () => {
    const root = shown('![x](javascript:alert(1))');
    expect(root.querySelector('img')).toBeNull();
    expect(root.querySelector('a[href^="javascript"]')).toBeNull();
    expect(root).toHaveTextContent('[x]');
  });

  it('still shows raw HTML images as text', () => {
    const root = shown('<img src="http://tracker.example/a.png">');
    expect(root.querySelector('img')).toBeNull();
    expect(root).toHaveTextContent('<img src="http://tracker.example/a.png">');
  });
});
